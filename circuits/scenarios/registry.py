"""Where scenarios come from: the built-in files in ``circuits/scenarios/data`` by name, or a
user's TOML file by path."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import ScenarioError
from .scenario import Scenario
from .schema import parse

DATA = Path(__file__).parent / "data"


def builtin() -> list[str]:
    """The names of the built-in scenarios."""
    return sorted(p.stem for p in DATA.glob("*.toml"))


def load(path: str | Path) -> Scenario:
    """Read a scenario TOML file; errors name the file and the bad key."""
    path = Path(path)
    if path.is_dir():
        raise ScenarioError(f"{path} is a directory; pass a scenario .toml file in it (or a built-in name: "
                            f"{', '.join(builtin())})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file {path}; built-in scenarios: {', '.join(builtin())}") from None
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML ({err})") from None
    except UnicodeDecodeError as err:
        raise ScenarioError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); a scenario is "
                            "a TOML text file") from None
    except OSError as err:
        raise ScenarioError(f"{path}: cannot be read ({err.strerror or err}); pass a readable scenario .toml "
                            "file") from None
    return parse(raw, path)


def get(name_or_path: str | Path | Scenario) -> Scenario:
    """A built-in scenario by name, or a user's TOML file by path (a :class:`Scenario` is
    returned as it is)."""
    if isinstance(name_or_path, Scenario):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        raise ScenarioError(f"scenario={name_or_path!r}: pass a built-in scenario name ({', '.join(builtin())}), "
                            "the path of a scenario .toml file or a Scenario")
    if not str(name_or_path).strip():
        raise ScenarioError(f"scenario={str(name_or_path)!r} is empty; built-in: {builtin()} (or pass a .toml path)")
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return load(p)
    if str(name_or_path) not in builtin():
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r}; built-in: {builtin()} (or pass a .toml path)")
    return load(DATA / f"{name_or_path}.toml")
