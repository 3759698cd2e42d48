"""Composition: precompiled skills spliced into any context.

A :class:`Skill` is a chunk of text (a policy, a document) whose KV cache is computed once
(:meth:`Skill.compile`) and then spliced after any prefix by :func:`compose`, which moves its
keys into place by RoPE rotation (:func:`notekv.splice`) and, optionally, recomputes the
first ``seam`` tokens against the real prefix. The same Skill object is reused across
contexts: its cache is never recomputed or modified.

Compile modes (what the skill's tokens saw when they were computed):

``"isolated"``
    The text alone from position 0. If the tokenizer adds a BOS token to a fresh prompt
    (Gemma-3), the text is prefilled behind that BOS and the BOS slot is dropped; otherwise
    (SmolLM2) the text's first token is at position 0 and acts as the attention sink.
``"sink"``
    The text behind one sink token whose slot is then **dropped** (the composed context has
    its own first token, which plays that role there). The sink token is the tokenizer's
    ``bos_token_id`` when it has one even if it does not add it (SmolLM2: ``<|im_start|>``;
    Gemma-3: ``<bos>``, so there ``"sink"`` equals ``"isolated"``), else the first of
    ``all_special_ids``, else the id of ``"\\n"``.
``"prefix"``
    The text after a shared system prefix (``prefix=``, default :data:`DEFAULT_SYSTEM`); only
    the skill's slots are kept.

The default mode is ``"prefix"``: it measured best on SmolLM2-135M (mean KL to the full
recompute over the suffix 0.034 vs 0.081 for ``"sink"`` and 0.092 for ``"isolated"``, 20
pairs; see the README section "Composition" and ``notekv eval-compose``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import InputError, NotFoundError, check_int
from .hooks.run import Run, as_kvcache
from .kv import KVCache, splice

MODES = ("isolated", "sink", "prefix")
SKILL_FORMAT = "notekv.skill/1"
DEFAULT_MODE = "prefix"
DEFAULT_SYSTEM = "You are a careful assistant. Follow the policy below exactly.\n"


def sink_token_id(model) -> int:
    """The sink token of ``"sink"`` mode: BOS if the tokenizer has one, else its first special
    token, else a newline."""
    tok = model.tokenizer
    if tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    special = list(getattr(tok, "all_special_ids", []) or [])
    if special:
        return int(special[0])
    return int(tok("\n", add_special_tokens=False)["input_ids"][0])


def _bos_ids(model) -> list[int]:
    """What the tokenizer puts before a fresh prompt (``[]`` or ``[bos]``)."""
    with_special = list(model.tokenize("a", special=True).ids)
    without = list(model.tokenize("a", special=False).ids)
    return with_special[: len(with_special) - len(without)]


def _lead_ids(model, mode: str, prefix: str | None) -> list[int]:
    """The tokens a skill is compiled behind in ``mode`` (its slots start after them)."""
    if mode == "isolated":
        return _bos_ids(model)
    if mode == "sink":
        return [sink_token_id(model)]
    return list(model.tokenize(prefix or "", special=True).ids)


def default_name(text: str) -> str:
    """A skill's default name: a digest of its text, the same in every process."""
    return "skill-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def unique_labels(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered (``policy``, ``policy#2``): one span per part."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def text_ids(model, text: str) -> list[int]:
    """The skill text's own token ids (no special tokens): the tokens a composition holds."""
    return list(model.tokenize(text, special=False).ids)


@dataclass(frozen=True)
class Skill:
    """A named, precompiled chunk: ``cache`` holds only the text's slots (at the positions it
    was computed at), ``mode`` and ``prefix`` say what those slots saw."""

    name: str
    text: str
    mode: str
    cache: KVCache
    prefix: str | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def token_ids(self) -> list[int]:
        return self.cache.token_ids.tolist()

    @classmethod
    def compile(cls, model, text: str, mode: str = DEFAULT_MODE, prefix: str | None = None,
                name: str | None = None) -> "Skill":
        """Prefill ``text`` once in ``mode`` (see the module docstring) and keep its slots."""
        if mode not in MODES:
            raise InputError(f"mode: unknown compile mode {mode!r}; choose one of {MODES}")
        ids = text_ids(model, text)
        if not ids:
            raise InputError("text: a skill needs a non-empty text")
        if mode == "prefix" and prefix is None:
            prefix = DEFAULT_SYSTEM
        lead = _lead_ids(model, mode, prefix)
        full = KVCache.prefill(model, torch.tensor([lead + ids]), segment=name or "skill")
        cache = full.select(range(len(lead), len(lead) + len(ids)))
        return cls(name or default_name(text), text, mode, cache, prefix if mode == "prefix" else None,
                   {"lead_ids": lead})

    # ------------------------------------------------------------------ files
    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write ``path`` (the KV-core ``.nkv`` file) and ``path + '.json'`` (name, text, mode,
        prefix) as one all-or-nothing save: the ``.nkv`` header records the sidecar's sha256
        and its rename commits the pair (see :mod:`notekv.kv.atomic`). A skill already saved
        there with different content is replaced only with ``overwrite=True``. Returns the
        ``.nkv`` path."""
        from .kv.store import cache_parts, write_cache_file

        path = Path(path)
        side = Path(str(path) + ".json")
        doc = {"format": SKILL_FORMAT, "name": self.name, "text": self.text, "mode": self.mode,
               "prefix": self.prefix, "meta": self.meta}
        data = json.dumps(doc, indent=1).encode()
        digest = hashlib.sha256(data).hexdigest()
        meta, tensors = cache_parts(self.cache, {"sidecar_sha256": digest})
        return write_cache_file(meta, tensors, path, overwrite=overwrite,
                                side=(side, lambda tmp: tmp.write_bytes(data), digest))

    @classmethod
    def load(cls, path, model) -> "Skill":
        """Read a saved skill; refuses another model's (``CacheMismatchError``), a corrupt or
        tampered file or sidecar, or a sidecar of another save (``CacheFileError`` naming the
        path). A sidecar that a stopped save left committed under its temporary name is read
        from there and moved into place."""
        from .kv import CacheFileError
        from .kv.atomic import adopt, committed_sidecar
        from .kv.store import load_cache_file

        path = Path(path)
        cache, header = load_cache_file(path, model)
        side = Path(str(path) + ".json")
        want = header.get("sidecar_sha256")  # absent in skills saved before pairs were recorded
        if want is not None and not (isinstance(want, str) and len(want) == 64):
            raise CacheFileError(f"{path}: its header's 'sidecar_sha256' is {want!r}, not a sha256 (edited header); "
                                 "re-save the skill")
        data = side.read_bytes() if side.is_file() else None
        if want is not None and (data is None or hashlib.sha256(data).hexdigest() != want):
            found = committed_sidecar(side, want)
            if found is not None and hashlib.sha256(found.read_bytes()).hexdigest() == want:
                data = found.read_bytes()
                adopt(found, side)
        if data is None:
            raise CacheFileError(f"{side} (the skill's metadata) is missing; save the skill with Skill.save")
        try:
            meta = json.loads(data.decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheFileError(f"{side} is not valid JSON ({err}); re-save the skill") from None
        if not isinstance(meta, dict) or meta.get("format") != SKILL_FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise CacheFileError(f"{side} is not a notekv skill sidecar (format {fmt!r})")
        missing = [k for k in ("name", "text", "mode") if not isinstance(meta.get(k), str)]
        if missing or meta["mode"] not in MODES:
            raise CacheFileError(f"{side}: missing or bad key(s) {missing or ['mode']}; re-save the skill")
        bad = [k for k, kind, default in (("prefix", (str, type(None)), None), ("meta", dict, {}))
               if not isinstance(meta.get(k, default), kind)]
        if bad:
            raise CacheFileError(f"{side}: bad value for key(s) {bad} (edited sidecar); re-save the skill")
        if text_ids(model, meta["text"]) != cache.token_ids.tolist():
            raise CacheFileError(f"{side}: its text does not tokenize to the cache's tokens (edited sidecar, or "
                                 "a sidecar of another skill); re-save the skill")
        lead = _lead_ids(model, meta["mode"], meta.get("prefix"))
        if len(cache) and int(cache.origin_positions[0]) != len(lead):
            raise CacheFileError(f"{side}: mode {meta['mode']!r} puts the skill at position {len(lead)} but the "
                                 f"cache was computed at {int(cache.origin_positions[0])} (edited mode or prefix); "
                                 "re-save the skill")
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise CacheFileError(f"{side} does not belong to {path} (its sha256 differs from the one {path.name} "
                                 "records: an edited sidecar, or one of another save); re-save the skill")
        return cls(meta["name"], meta["text"], meta["mode"], cache, meta.get("prefix"), meta.get("meta", {}))


class SkillStore:
    """A directory of skills: ``NAME.nkv`` + ``NAME.nkv.json`` each."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"directory={str(self.directory)!r} is a file; pass a directory for the skill store")
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InputError(f"bad skill name {name!r}: use a plain file name (no '/', '\\' or leading '.')")
        return self.directory / f"{name}.nkv"

    def put(self, skill: Skill, *, overwrite: bool = False) -> Path:
        """Save ``skill`` as entry ``skill.name`` (all-or-nothing); an entry of that name with
        different content is replaced only with ``overwrite=True``."""
        from .kv.atomic import OverwriteError

        try:
            return skill.save(self._path(skill.name), overwrite=overwrite)
        except OverwriteError:
            raise OverwriteError(f"skill {skill.name!r} is already in {self.directory} with different content; "
                                 "pass overwrite=True to replace it, or give the skill another name") from None

    def get(self, name: str, model) -> Skill:
        path = self._path(name)
        if not path.is_file():
            raise NotFoundError(f"no skill {name!r} in {self.directory}; have {self.names()}")
        return Skill.load(path, model)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(".nkv")] for p in self.directory.glob("*.nkv") if not p.name.startswith("."))


class Composition:
    """What :func:`compose` returns.

    ``spans``: ``{label: (start, end)}`` slot ranges of each part; ``logits``: the suffix's
    logits, ``[1, s, vocab]`` (``logits="all"``) or ``[1, 1, vocab]`` (``"last"``), None
    without a suffix; ``run``: the suffix's :class:`~notekv.Run` on the HF path (None on the
    lean path); ``engine``: ``"hf"`` or ``"lean"``. ``cache`` (prefix + skills + suffix as one
    KVCache at positions ``0..``) is assembled on first access.
    """

    def __init__(self, spans: dict, logits: torch.Tensor | None, *, engine: str, run=None,
                 cache: KVCache | None = None, build=None):
        self.spans = spans
        self.logits = logits
        self.engine = engine
        self.run = run
        self._cache = cache
        self._build = build

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self._build()
            self._build = None
        return self._cache

    @property
    def last_logits(self) -> torch.Tensor | None:
        """Logits of the last suffix token ``[1, vocab]``."""
        return None if self.logits is None else self.logits[:, -1]

    def __repr__(self) -> str:
        return f"Composition(engine={self.engine!r}, spans={self.spans})"


ENGINES = ("auto", "hf", "lean")


def _ids(model, x, special: bool) -> list[int]:
    return list(model.tokenize(x, special=special).ids) if isinstance(x, str) else [int(t) for t in x]


def _labels(spans: dict) -> tuple[str, ...]:
    out: list[str] = []
    for lab, (a, b) in spans.items():
        out += [lab] * (b - a)
    return tuple(out)


def _has_hooks(model) -> bool:
    """Hooks the lean engine would bypass: a notekv context or a user's torch hooks (not the
    output-capturing hooks transformers installs for itself and keeps)."""
    for m in model.hf.modules():
        for fn in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()):
            if not str(getattr(fn, "__module__", "")).startswith("transformers."):
                return True
    return False


def compose(model, prefix: "str | Sequence[int] | KVCache | Run", skills: Sequence[Skill],
            suffix: str | Sequence[int] | None = None, *, seam: int = 0, logits: str = "all",
            engine: str = "auto", backend: str = "auto") -> Composition:
    """Splice ``skills`` after ``prefix`` and run ``suffix`` (text without special tokens, or
    ids) if given.

    ``prefix``: text (prefilled, with BOS if the tokenizer adds one), token ids, or a
    KVCache (or a Run, whose ``kv`` is taken) already computed (an exact prefix hit: placed at
    slot 0 without recomputation).
    ``seam``: recompute the first ``seam`` tokens of every skill against the real prefix.
    ``logits``: ``"all"`` suffix positions or only the ``"last"``.
    ``engine``: ``"hf"`` (transformers forward through the hook layer), ``"lean"`` (static
    buffer, grouped attention, fused rotation into the buffer, CUDA graphs on CUDA; see
    :mod:`notekv.lean`) or ``"auto"`` (lean on CUDA when the family supports it and no hooks
    are registered on the model, else HF); ``"lean"`` with hooks registered is refused. Continue with
    ``model.run(more, past=result.cache)`` or ``model.generate(text, past=result.cache)``.
    """
    if model.spec.kv_refusal is not None:
        from .model.arch import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(f"compose on this {model.spec.model_type} model: {model.spec.kv_refusal}")
    if engine not in ENGINES:
        raise InputError(f"engine {engine!r}: choose one of {ENGINES}")
    if logits not in ("all", "last"):
        raise InputError(f"logits {logits!r}: choose 'all' or 'last'")
    check_int("seam", seam, low=0)
    if isinstance(skills, (Skill, KVCache)) or isinstance(skills, str):
        raise InputError(f"skills must be a list of Skill objects, got one {type(skills).__name__}; wrap it: [skill]")
    bad = [type(sk).__name__ for sk in skills if not isinstance(sk, Skill)]
    if bad:
        raise InputError(f"skills must be Skill objects (Skill.compile / SkillStore.get), got {bad[0]}")
    for what, part in (("prefix", prefix), ("suffix", suffix)):
        if isinstance(part, (str, list, tuple, torch.Tensor)) and len(part) == 0:
            raise InputError(f"compose {what} is empty; pass text or ids with at least one token"
                             + (" (or suffix=None for no suffix)" if what == "suffix" else ""))
    if not isinstance(prefix, (str, list, tuple, torch.Tensor)):  # a cache-like prefix: one conversion
        prefix = as_kvcache(prefix, model, "compose prefix")
        if prefix is None:
            raise InputError("compose prefix: the cache is empty; pass text, ids or a cache that holds slots")
    for sk in skills:
        sk.cache.check_model(model)
    hooked = _has_hooks(model)
    if engine == "auto":
        from .lean import lean_support

        engine = "lean" if model.device.type == "cuda" and lean_support(model) is None and not hooked else "hf"
    if engine == "lean":
        if hooked:
            raise InputError(
                "hooks are registered on the model (a model.hooks(...) context or torch hooks) and the "
                "lean engine would bypass them; compose with engine='hf' inside hook contexts"
            )
        return _compose_lean(model, prefix, skills, suffix, seam=seam, logits=logits, backend=backend)
    return _compose_hf(model, prefix, skills, suffix, seam=seam, logits=logits, backend=backend)


def _compose_hf(model, prefix, skills, suffix, *, seam, logits, backend) -> Composition:
    if isinstance(prefix, KVCache):
        head = prefix.relabel("prefix")
    else:
        head = KVCache.from_run(model.run(torch.tensor([_ids(model, prefix, True)]), logits="last"), model,
                                segment="prefix")
    parts = [head] + [s.cache for s in skills]
    labels = unique_labels(["prefix"] + [s.name for s in skills])
    cache = splice(model, parts, seam=seam, labels=labels, backend=backend)
    spans, at = {}, 0
    for lab, p in zip(labels, parts):
        spans[lab] = (at, at + len(p))
        at += len(p)
    if suffix is None:
        return Composition(spans, None, engine="hf", cache=cache)
    ids = _ids(model, suffix, False)
    run = model.run(torch.tensor([ids]), past=cache, logits=logits)
    spans["suffix"] = (at, at + len(ids))

    def build() -> KVCache:
        tail = KVCache.from_hf(run.hf_cache, model, cache.token_ids.tolist() + ids)
        return cache.concat(tail.select(range(len(cache), len(cache) + len(ids))).relabel("suffix"))

    return Composition(spans, run.logits, engine="hf", run=run, build=build)


def _compose_lean(model, prefix, skills, suffix, *, seam, logits, backend) -> Composition:
    from .lean import engine_for

    head_ids = None if isinstance(prefix, KVCache) else _ids(model, prefix, True)
    n_head = len(prefix) if head_ids is None else len(head_ids)
    suf_ids = None if suffix is None else _ids(model, suffix, False)
    total = n_head + sum(len(s) for s in skills) + (len(suf_ids) if suf_ids else 0)
    eng = engine_for(model, total)
    if head_ids is None:
        eng.place(prefix, 0, backend=backend)
    else:
        eng.prefill(head_ids, logits=None)
    spans = {"prefix": (0, n_head)}
    for label, sk in zip(unique_labels(["prefix"] + [s.name for s in skills])[1:], skills):
        start, end = eng.place(sk.cache, backend=backend)
        spans[label] = (start, end)
        if seam:
            k = min(seam, end - start)
            eng.prefill(sk.cache.token_ids[:k], at=start, logits=None)
    out = None
    if suf_ids is not None:
        out = eng.prefill(suf_ids, logits=logits)
        spans["suffix"] = (eng.length - len(suf_ids), eng.length)
        out = out if logits == "all" else out[:, None]
    epoch = eng.epoch

    def build() -> KVCache:
        if eng.epoch != epoch or getattr(model, "_lean_engine", None) is not eng:
            raise RuntimeError(
                "the model's lean engine has run another composition since this one; read "
                "Composition.cache before composing again (or compose with engine='hf')"
            )
        return eng.snapshot(segments=_labels(spans))

    return Composition(spans, out, engine="lean", build=build)
