"""Scoring a cache state at a decision cue, and the cost record of an edit.

``Decision``: each choice scored by the log-probability of its continuation after the cue,
with and without a leading space (both reported; one decides). ``EditCost``: tokens
recomputed, a FLOP estimate and wall time of one edit.

FLOP estimate: ``2 * N * t`` where ``N`` is the model's non-embedding parameter count and
``t`` the number of token-forwards (a partial forward through ``k`` of ``L`` layers counts
``k / L``). It ignores attention-score FLOPs (small at these lengths) and the unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import InputError


@dataclass
class Decision:
    """The scores of ``choices`` after ``cue``.

    ``logp_space[c]`` / ``logp_nospace[c]``: summed log-probability of the continuation
    ``" " + c`` / ``c``. ``logp``: the variant that decides (``space``). ``choice``: argmax
    of ``logp``. ``margin``: ``logp[choices[0]] - logp[choices[1]]`` (best minus second for
    more than two choices). ``agree``: both variants pick the same choice. ``next_logprobs``:
    log-softmax over the vocabulary at the cue's last token (for KL).
    """

    cue: str
    choices: tuple[str, ...]
    logp_space: dict
    logp_nospace: dict
    space: bool
    next_logprobs: torch.Tensor = field(repr=False)
    tokens_run: int = 0

    @property
    def logp(self) -> dict:
        return self.logp_space if self.space else self.logp_nospace

    @property
    def choice(self) -> str:
        return max(self.choices, key=lambda c: self.logp[c])

    @property
    def margin(self) -> float:
        if len(self.choices) == 2:
            return self.logp[self.choices[0]] - self.logp[self.choices[1]]
        top = sorted((self.logp[c] for c in self.choices), reverse=True)
        return top[0] - top[1]

    @property
    def agree(self) -> bool | None:
        """Both variants pick the same choice (None when only one was scored)."""
        if any(v != v for v in list(self.logp_space.values()) + list(self.logp_nospace.values())):
            return None
        a = max(self.choices, key=lambda c: self.logp_space[c])
        b = max(self.choices, key=lambda c: self.logp_nospace[c])
        return a == b

    def kl_from(self, reference: "Decision") -> float:
        """``KL(reference || self)`` of the next-token distributions at the cue's last token."""
        p = reference.next_logprobs
        return float((p.exp() * (p - self.next_logprobs)).sum().clamp_min(0))

    def to_json(self) -> dict:
        return {"cue": self.cue, "choice": self.choice, "margin": self.margin, "space": self.space,
                "logp_space": self.logp_space, "logp_nospace": self.logp_nospace, "agree": self.agree}


def _words(choices: Sequence[str]) -> tuple[str, ...]:
    if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
        raise InputError(f"choices={choices!r}: pass a list of answer words, e.g. ['yes', 'no']")
    words = tuple(c.strip() for c in choices)
    if len(words) < 2 or any(not w for w in words):
        raise InputError(f"choices: decide needs at least two non-blank choices, got {list(choices)}")
    if len(set(words)) != len(words):
        raise InputError(f"choices {list(choices)} repeat a word")
    return words


@torch.no_grad()
def decide(model, cache, cue: str, choices: Sequence[str], space: str | bool = "auto", both: bool = True) -> Decision:
    """Score ``choices`` after ``cue`` continued from ``cache`` (a KVCache, never modified).

    ``space``: which variant decides — True (``" word"``), False (``"word"``) or ``"auto"``
    (with a space unless the cue ends in whitespace). ``both``: also score the other variant
    (reported, not deciding); ``both=False`` leaves its scores NaN and saves its forwards.
    """
    words = _words(choices)
    if not isinstance(cue, str):
        raise InputError(f"cue={cue!r}: pass the cue as text (e.g. 'Decision:')")
    use_space = (not cue[-1:].isspace()) if space == "auto" else bool(space)
    ids, _ = model.encode(cue, start=len(cache))
    if ids.shape[1] == 0:
        raise InputError("cue: the cue tokenizes to nothing; pass a non-empty cue")
    run = model.run(ids, past=cache, logits="last")
    last = torch.log_softmax(run.logits[0, -1].float(), -1)
    tok = model.tokenizer
    scores: dict[bool, dict] = {True: {}, False: {}}
    n_run = ids.shape[1]
    for w in words:
        for sp in (True, False):
            if not both and sp != use_space:
                scores[sp][w] = float("nan")
                continue
            cont = tok((" " + w) if sp else w, add_special_tokens=False)["input_ids"]
            lp = float(last[cont[0]])
            if len(cont) > 1:
                more = model.run(torch.tensor([cont[:-1]]), past=run, logits="all")
                n_run += len(cont) - 1
                lps = torch.log_softmax(more.logits[0].float(), -1)
                lp += float(sum(lps[i, t] for i, t in enumerate(cont[1:])))
            scores[sp][w] = lp
    return Decision(cue, words, scores[True], scores[False], use_space, last, n_run)


def decision_tokens(model, cue: str, choices: Sequence[str], space: bool, start: int) -> int:
    """Tokens a decision with only the deciding variant runs: the cue plus every token but
    the last of each multi-token continuation."""
    tok = model.tokenizer
    n = len(model.encode(cue, start=start)[0][0])
    for w in _words(choices):
        n += len(tok((" " + w) if space else w, add_special_tokens=False)["input_ids"]) - 1
    return n


def non_embedding_params(model) -> int:
    """Parameters outside the input embedding (and a tied unembedding)."""
    emb = model.hf.get_input_embeddings().weight
    out = model.hf.get_output_embeddings()
    skip = {id(emb)} | ({id(out.weight)} if out is not None else set())
    return sum(p.numel() for p in model.hf.parameters() if id(p) not in skip)


@dataclass
class EditCost:
    """Cost of one edit. ``tokens``: token positions recomputed (any depth); ``token_forwards``:
    full-depth equivalents (``layers_run / n_layers`` summed); ``flops``: ``2 * N * token_forwards``
    (see the module docstring); ``wall_s``: wall time of the edit; ``needs_full``: the mode
    ran a full recompute (oracle selective, full, an escalated auto); ``detail``: what ran."""

    mode: str
    tokens: int = 0
    token_forwards: float = 0.0
    flops: float = 0.0
    wall_s: float = 0.0
    needs_full: bool = False
    detail: list = field(default_factory=list)
    reused_wall_s: float = 0.0  # wall time of reused work (an earlier ranking), included in wall_s

    def add(self, what: str, tokens: int, model, layers: int | None = None) -> None:
        """Record ``tokens`` recomputed through ``layers`` layers (all by default)."""
        n_layers = model.spec.n_layers
        frac = (layers if layers is not None else n_layers) / n_layers
        self.tokens += int(tokens)
        self.token_forwards += tokens * frac
        self.flops += 2.0 * _n_params(model) * tokens * frac
        self.detail.append(f"{what}: {tokens} token(s)" + (f" x {layers}/{n_layers} layers" if layers is not None else ""))

    def merge(self, other: "EditCost", prefix: str = "") -> None:
        self.tokens += other.tokens
        self.token_forwards += other.token_forwards
        self.flops += other.flops
        self.needs_full |= other.needs_full
        self.detail += [prefix + d for d in other.detail]

    def to_json(self) -> dict:
        return {"mode": self.mode, "tokens": self.tokens, "token_forwards": round(self.token_forwards, 4),
                "flops": self.flops, "wall_s": round(self.wall_s, 6), "needs_full": self.needs_full,
                "detail": list(self.detail)}


_PARAMS: dict[int, int] = {}


def _n_params(model) -> int:
    key = id(model.hf)
    if key not in _PARAMS:
        _PARAMS[key] = non_embedding_params(model)
    return _PARAMS[key]
