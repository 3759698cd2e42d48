"""All-or-nothing saves of one file or of a main file with its sidecar.

Every file is written inside a hidden temporary directory next to its destination
(``.NAME.wTAG.tmp/``, which also holds any scratch file the writer makes), flushed to disk
(fsync) and renamed over the destination last, so a reader finds the old file or the new one,
never a part of either.

A pair (a main file and its sidecar) commits with one rename, the main file's: the main file
records the sidecar's digest, and the new sidecar waits under a temporary named by that
digest (``.SIDE.DIGEST16.tmp``) until the main file is in place; it is renamed over the
sidecar right after. A process killed between the two renames leaves the new main file with
its sidecar under that temporary name: loaders look there (:func:`committed_sidecar`) and move
it into place, so they read the old pair or the new pair, never a mix. Before the main
file's rename, the old pair is untouched.

On an exception a save removes its temporaries. A killed save may leave hidden temporaries;
loaders ignore them and the next save of the same destination removes them (one writer per
destination at a time). A destination that holds different content is replaced only with
``overwrite=True``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

from ..errors import InputError, NotekvError


class OverwriteError(InputError, FileExistsError):
    """A save onto a file (or store entry) that holds different content, without ``overwrite=True``."""


class SaveError(NotekvError, OSError):
    """A save the file system refused (no permission, no space): the message names the path."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows): renames are durable there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _unlink(path: Path) -> None:
    """Remove a file or a temporary directory and what it holds; gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def destination(path, what: str = "path") -> Path:
    """``path`` as a file destination: refuses a directory, creates missing parent directories."""
    p = Path(path)
    if p.is_dir():
        example = str(p / ("name" + (p.suffix or ".nkv")))
        raise InputError(f"{what}={str(p)!r} is a directory; pass a file path, e.g. {example!r}")
    if p.name in ("", ".", ".."):
        raise InputError(f"{what}={str(p)!r}: not a file name; pass a file path such as 'out.nkv'")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{what}={str(p)!r}: a parent of it is a file, not a directory; choose a path in a "
                         "directory") from None
    except OSError as err:
        raise SaveError(f"{what}={str(p)!r}: cannot create its directory ({err.strerror or err})") from None
    return p


def temporary(target: Path, tag: str) -> Path:
    """The hidden temporary of ``target`` with ``tag`` (``.NAME.TAG.tmp``, same directory)."""
    return target.with_name(f".{target.name}.{tag}.tmp")


def _temporaries(target: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(w[0-9a-f]{{12}}|[0-9a-f]{{16}})\.tmp")
    try:
        return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []


def pending(side: Path, digest: str) -> Path:
    """Where a committed sidecar with ``digest`` waits until it is renamed over ``side``."""
    return temporary(side, digest[:16])


def committed_sidecar(side: Path, digest: str) -> Path | None:
    """The temporary holding the sidecar a main file records as ``digest``, if a save was
    stopped before renaming it into place (the caller verifies its content, then calls
    :func:`adopt`)."""
    if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
        return None
    p = pending(side, digest)
    return p if p.is_file() else None


def adopt(found: Path, side: Path) -> Path:
    """Finish a stopped save: rename the verified sidecar ``found`` over ``side``. Returns the
    path that holds it (``found`` again where the directory is read-only)."""
    try:
        _replace(found, side)
        _fsync_dir(side.parent)
        return side
    except OSError:
        return found if found.is_file() else side


def write_temporary(target: Path, write: Callable[[Path], None], what: str = "path") -> Path:
    """Call ``write(tmp)`` on a fresh file inside a new hidden temporary directory next to
    ``target`` and fsync it; returns that file. On any exception the directory is removed."""
    box = temporary(target, "w" + secrets.token_hex(6))
    tmp = box / target.name
    try:
        box.mkdir()
        write(tmp)
        _fsync_file(tmp)
    except BaseException as err:
        _unlink(box)
        if isinstance(err, OSError) and not isinstance(err, NotekvError):
            raise SaveError(f"{what}={str(target)!r}: cannot write it ({err.strerror or err}); choose a "
                            "writable directory with free space") from None
        raise
    return tmp


def save(target: Path, write: Callable[[Path], None], *, content: str, existing: Callable[[Path], str | None],
         overwrite: bool, what: str = "path", side: tuple[Path, Callable[[Path], None], str] | None = None,
         fix: str = "pass overwrite=True to replace it, or choose another path") -> Path:
    """Write ``target`` (and ``side``) all-or-nothing.

    ``write(tmp)`` writes the main file; ``content`` identifies what it holds, and
    ``existing(target)`` reads that identity from a file already there (None if unreadable).
    A different one is replaced only with ``overwrite``; the same one is written again.
    ``side``: ``(path, write, digest)`` of a sidecar whose ``digest`` the main file records.
    """
    target = destination(target, what)
    if not overwrite and target.exists():
        try:
            old = existing(target)
        except Exception:  # an unreadable or foreign file: its content is not ours
            old = None
        if old != content:
            raise OverwriteError(f"{what}={str(target)!r} already holds different content; {fix}")
    if side is not None and side[0].is_dir():
        raise InputError(f"{what}={str(target)!r}: its sidecar path {str(side[0])!r} is a directory; move it away "
                         "or choose another path")
    if not overwrite and side is not None and not target.exists() and side[0].exists():
        raise OverwriteError(f"{what}={str(target)!r}: {side[0]} is already there without it; {fix}")
    made: list[Path] = []
    side_tmp = None
    try:
        if side is not None:
            side_path, side_write, digest = side
            tmp = write_temporary(side_path, side_write, what)
            made.append(tmp.parent)
            side_tmp = pending(side_path, digest)
            if not side_tmp.exists():  # else the same content waits there already: never removed here
                made.append(side_tmp)
            _replace(tmp, side_tmp)
            _fsync_dir(side_path.parent)  # the sidecar is on disk before the main file can name it
        main_tmp = write_temporary(target, write, what)
        made.append(main_tmp.parent)
        _replace(main_tmp, target)  # the commit
        _fsync_dir(target.parent)
    except BaseException as err:
        for p in made:
            _unlink(p)
        if isinstance(err, OSError) and not isinstance(err, NotekvError):
            raise SaveError(f"{what}={str(target)!r}: cannot write it ({err.strerror or err})") from None
        raise
    for p in made:  # the emptied temporary directories
        if p != side_tmp:
            _unlink(p)
    if side_tmp is not None:
        try:
            _replace(side_tmp, side[0])
            _fsync_dir(target.parent)
        except OSError as err:  # the pair is committed; loaders read the sidecar where it waits
            raise SaveError(f"{what}={str(target)!r} was saved but its sidecar stayed at {side_tmp} "
                            f"({err.strerror or err}); loading finds it there") from None
    for t in [target] + ([side[0]] if side is not None else []):
        for p in _temporaries(t):  # this save's emptied directories, and what killed saves left
            _unlink(p)
    return target
