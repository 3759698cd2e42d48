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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .kv import KVCache, splice

MODES = ("isolated", "sink", "prefix")
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
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {MODES}")
        ids = text_ids(model, text)
        if not ids:
            raise ValueError("a skill needs a non-empty text")
        if mode == "isolated":
            lead = _bos_ids(model)
        elif mode == "sink":
            lead = [sink_token_id(model)]
        else:
            prefix = DEFAULT_SYSTEM if prefix is None else prefix
            lead = list(model.tokenize(prefix, special=True).ids)
        full = KVCache.prefill(model, torch.tensor([lead + ids]), segment=name or "skill")
        cache = full.select(range(len(lead), len(lead) + len(ids)))
        return cls(name or f"skill-{abs(hash(text)) % 10**8}", text, mode, cache,
                   prefix if mode == "prefix" else None, {"lead_ids": lead})

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write ``path`` (the KV-core ``.nkv`` file) and ``path + '.json'`` (name, text, mode,
        prefix). Returns the ``.nkv`` path."""
        path = Path(path)
        self.cache.save(path)
        meta = {"format": "notekv.skill/1", "name": self.name, "text": self.text, "mode": self.mode,
                "prefix": self.prefix, "meta": self.meta}
        Path(str(path) + ".json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path, model) -> "Skill":
        """Read a saved skill; refuses another model's (``CacheMismatchError``) or a corrupt file."""
        path = Path(path)
        side = Path(str(path) + ".json")
        if not side.is_file():
            raise FileNotFoundError(f"{side} (the skill's metadata) is missing; save the skill with Skill.save")
        meta = json.loads(side.read_text())
        cache = KVCache.load(path, model)
        return cls(meta["name"], meta["text"], meta["mode"], cache, meta.get("prefix"), meta.get("meta", {}))


class SkillStore:
    """A directory of skills: ``NAME.nkv`` + ``NAME.nkv.json`` each."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"bad skill name {name!r}: use a plain file name")
        return self.directory / f"{name}.nkv"

    def put(self, skill: Skill) -> Path:
        return skill.save(self._path(skill.name))

    def get(self, name: str, model) -> Skill:
        path = self._path(name)
        if not path.is_file():
            raise KeyError(f"no skill {name!r} in {self.directory}; have {self.names()}")
        return Skill.load(path, model)

    def names(self) -> list[str]:
        return sorted(p.name[: -len(".nkv")] for p in self.directory.glob("*.nkv"))


@dataclass
class Composition:
    """What :func:`compose` returns. ``cache``: prefix + skills (+ suffix, if one was given)
    as one KVCache at positions ``0..``; ``run``: the suffix's Run (logits at every suffix
    position) or None; ``spans``: ``{label: (start, end)}`` slot ranges of each part."""

    cache: KVCache
    run: object | None
    spans: dict

    @property
    def logits(self) -> torch.Tensor | None:
        return None if self.run is None else self.run.logits


def compose(model, prefix: str | Sequence[int], skills: Sequence[Skill], suffix: str | Sequence[int] | None = None,
            *, seam: int = 0, backend: str = "auto") -> Composition:
    """Splice ``skills`` after ``prefix`` (text, prefilled with BOS if the tokenizer adds one,
    or token ids) and run ``suffix`` (text without special tokens, or ids) if given.

    ``seam``: recompute the first ``seam`` tokens of every skill against the real prefix.
    Continue with ``model.run(more, past=result.cache)`` or
    ``model.generate(text, past=result.cache)``.
    """
    pre = torch.tensor([list(prefix)]) if not isinstance(prefix, str) else torch.tensor([list(model.tokenize(prefix, special=True).ids)])
    head = KVCache.from_run(model.run(pre, logits="last"), model, segment="prefix")
    parts = [head] + [s.cache for s in skills]
    labels = ["prefix"] + [s.name for s in skills]
    cache = splice(model, parts, seam=seam, labels=labels, backend=backend)
    spans, at = {}, 0
    for lab, p in zip(labels, parts):
        spans[lab] = (at, at + len(p))
        at += len(p)
    run = None
    if suffix is not None:
        ids = list(model.tokenize(suffix, special=False).ids) if isinstance(suffix, str) else list(suffix)
        run = model.run(torch.tensor([ids]), past=cache, logits="all")
        cache = cache.concat(KVCache.from_hf(run.kv, model, cache.token_ids.tolist() + ids).select(
            range(len(cache), len(cache) + len(ids))).relabel("suffix"))
        spans["suffix"] = (at, at + len(ids))
    return Composition(cache, run, spans)
