"""A hostile user's inputs: every one gets notekv's own error naming the problem, or the right
answer; never a silent wrong number, a traceback from inside torch, a mutated shared cache
or a leaked hook. ``CASES`` is the table the project's misuse count comes from."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

import notekv as nk
from conftest import count_hooks, tiny_model
from notekv.errors import NotekvError

TEXT = "order_status: shipped. Refund?"
OTHER = "order_status: stopped. Refund?"


class Env:
    """Shared objects of the cases (built once)."""

    def __init__(self):
        self.m = tiny_model("llama")
        self.other = nk.tiny("llama", seed=1)  # same shapes, other weights
        self.gemma = tiny_model("gemma3_text")
        self.run = self.m.run(TEXT, collect=["L1.resid_pre", "L0.attn.z"])
        self.src = self.m.run(OTHER, collect=["L1.resid_pre"])
        self.other_run = self.other.run(TEXT, collect=["L1.resid_pre"])
        self.cache = nk.KVCache.prefill(self.m, "Refunds within 30 days.\n")
        self.n = len(self.m.tokenize(TEXT))


_env: Env | None = None


def env() -> Env:
    global _env
    if _env is None:
        _env = Env()
    return _env


def _ctx(e, **kw):
    return nk.EditableContext(e.m, "Refunds only if delivered.\norder_status: {status}\n", fields={"status": "delivered"},
                              cue="Refund request:", choices=["granted", "denied"], **kw).prefill()


def _scenario_file(tmp, body: str):
    p = tmp / "s.toml"
    p.write_text(body)
    from circuits import scenarios

    return scenarios.load(p)


GOOD_TOML = """name = "x"\nkind = "gate"\nfield = "f"\npositive_values = ["a"]\nnegative_values = ["b"]
policy = "p"\nquery = "f: {value} ->"\nanswers = { positive = " y", negative = " n" }\n"""

# (id, fn(env, tmp_path), expected error class, regex the message must match)
CASES = [
    # -- positions that are not where the user thinks; isolation; grads; model files
    ("span-into-the-past-cache", lambda e, t: e.m.run(" Yes.", past=e.run, interventions=[
        nk.Ablate("L1.resid_pre", at=nk.Span("shipped"))]), nk.SlotError, "past cache"),
    ("span-straddling-past-and-new", lambda e, t: e.m.run(" Yes.", past=e.run, interventions=[
        nk.Ablate("L1.resid_pre", at=nk.Span("d? Yes"))]), nk.SlotError, "part of its slots"),
    ("patch-tensor-of-another-length", lambda e, t: e.m.run(TEXT, interventions=[
        nk.Patch("L1.resid_pre", e.run["L1.resid_pre"][:, :7], at=nk.Pos(3, 4))]), nk.PlanError, "fits neither"),
    ("continue-a-gapped-cache", lambda e, t: e.m.run(" more", past=e.cache.drop([2])), nk.PositionError, "contiguous"),
    ("prompt-past-the-positions", lambda e, t: nk.tiny("llama", max_position_embeddings=16).run("x" * 20),
     nk.PositionError, "16 positions"),
    ("grads-of-another-runs-score", lambda e, t: e.m.run(TEXT, interventions=[nk.Tap("L1.resid_pre")], grad=True).grads(
        e.m.run(OTHER, interventions=[nk.Tap("L1.resid_pre")], grad=True).logits[0, -1].sum()), nk.GradError,
     "another Run"),
    ("collect-span-on-different-texts", lambda e, t: e.m.run([TEXT, "x" + TEXT[:-1]], interventions=[
        nk.Collect("L1.resid_pre", at=nk.Span("Refund"))]), nk.PlanError, "different"),
    ("gguf-that-is-not-one", lambda e, t: (t / "m.gguf").write_text("not a model") and nk.load(str(t / "m.gguf")),
     nk.ModelFileError, "not a GGUF"),
    # -- 3: sources of another model
    ("patch-run-of-other-model", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", e.other_run, at=nk.Last())]),
     nk.CacheMismatchError, "another model"),
    ("kvpatch-run-of-other-model", lambda e, t: e.m.run(TEXT, interventions=[nk.KVPatch(e.other_run, at=1)]),
     nk.CacheMismatchError, "another model"),
    ("kvpatch-kvcache-of-other-model", lambda e, t: e.m.run(TEXT, interventions=[nk.KVPatch(e.other_run.kv, at=1)]),
     nk.CacheMismatchError, "another model"),
    ("past-run-of-other-model", lambda e, t: e.m.run(" more", past=e.other_run), nk.CacheMismatchError, "another model"),
    ("past-kvcache-of-other-model", lambda e, t: e.m.run(" more", past=e.other_run.kv), nk.CacheMismatchError, "another model"),
    ("past-hf-cache-of-other-model", lambda e, t: e.m.run(" more", past=e.other_run.hf_cache), nk.CacheMismatchError,
     "another model"),
    ("past-hf-cache-of-other-shape", lambda e, t: e.m.run(" more", past=nk.hooks.copy_cache(e.gemma.run("hi").hf_cache)),
     nk.CacheMismatchError,
     "layers|shape"),
    ("compose-prefix-of-other-model", lambda e, t: nk.compose(e.m, e.other_run.kv, [], "x", engine="hf"),
     nk.CacheMismatchError, "another model"),
    ("splice-cache-of-other-model", lambda e, t: nk.splice(e.m, ["a", e.other_run.kv]), nk.CacheMismatchError,
     "another model"),
    ("kvcache-patch-across-models", lambda e, t: e.run.kv.patch(e.other_run.kv, [1]), nk.CacheMismatchError, "different models"),
    # -- 8: positions that never fire
    ("pos-far-negative", lambda e, t: e.m.run(TEXT, interventions=[nk.Ablate("L1.resid_pre", at=nk.Pos(-100))]),
     nk.SlotError, "slot -"),
    ("pos-past-the-prompt", lambda e, t: e.m.run(TEXT, interventions=[nk.Ablate("L1.resid_pre", at=nk.Pos(500))]),
     nk.SlotError, "slot 500"),
    ("range-past-the-prompt", lambda e, t: e.m.run(TEXT, interventions=[nk.Steer("L1.resid_pre", torch.ones(64), at=nk.Range(0, 99))]),
     nk.SlotError, "outside"),
    ("kvpatch-slot-past-the-cache", lambda e, t: e.m.run(TEXT, interventions=[nk.KVPatch(e.src, at=nk.Pos(60))]),
     nk.SlotError, "slot 60"),
    ("knockout-dst-past-the-prompt", lambda e, t: e.m.run(TEXT, interventions=[nk.Knockout(src=nk.Pos(1), dst=nk.Pos(99))]),
     nk.SlotError, "slot 99"),
    ("patch-source-of-other-length", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", e.m.run(TEXT + " Yes please", collect=["L1.resid_pre"]))]),
     nk.PlanError, "source covers slots"),
    ("patch-source-too-short", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", e.m.run("order", collect=["L1.resid_pre"]), at=nk.Last())]),
     IndexError, "source covers slots"),
    ("span-absent", lambda e, t: e.m.run(TEXT, interventions=[nk.Ablate("L1.resid_pre", at=nk.Span("nowhere"))]),
     nk.SpanError, "not found"),
    ("text-selector-on-ids", lambda e, t: e.m.run(e.run.ids[0].tolist(), interventions=[nk.Ablate("L1.resid_pre", at=nk.Span("Refund"))]),
     nk.SpanError, "needs the prompt text"),
    ("perrow-wrong-batch", lambda e, t: e.m.run([TEXT, TEXT], interventions=[nk.Ablate("L1.resid_pre", at=nk.PerRow(nk.Pos(1)))]),
     nk.PlanError, "PerRow has 1 rows but the forward has 2"),
    ("perrow-on-collect", lambda e, t: e.m.run(TEXT, interventions=[nk.Collect("L1.resid_pre", at=nk.PerRow(nk.Pos(1)))]),
     nk.PlanError, "PerRow"),
    ("perrow-empty", lambda e, t: nk.PerRow(), ValueError, "one selector per batch row"),
    # -- 9: shapes, empties, hooks
    ("run-empty-text", lambda e, t: e.m.run(""), nk.InputError, "empty"),
    ("run-empty-list", lambda e, t: e.m.run([]), nk.InputError, "empty list"),
    ("run-empty-ids", lambda e, t: e.m.run(torch.zeros(1, 0, dtype=torch.long)), nk.InputError, "no tokens"),
    ("run-float-ids", lambda e, t: e.m.run(torch.ones(1, 3)), nk.InputError, "integers"),
    ("run-id-outside-vocab", lambda e, t: e.m.run([1, 2, 10**6]), nk.InputError, "vocabulary"),
    ("run-negative-id", lambda e, t: e.m.run([1, -5]), nk.InputError, "vocabulary"),
    ("run-ragged-batch-text", lambda e, t: e.m.run(["a", "a longer one"]), nk.InputError, "different lengths"),
    ("run-ragged-batch-ids", lambda e, t: e.m.run([[1, 2], [3]]), nk.InputError, "different lengths"),
    ("run-dict-input", lambda e, t: e.m.run({"text": TEXT}), nk.InputError, "expected str"),
    ("patch-wrong-d-model", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", torch.zeros(1, e.n, 32), at=nk.Last())]),
     nk.PlanError, "shape"),
    ("patch-wrong-heads", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L0.attn.z", torch.zeros(1, 3, e.n, 16), at=nk.Last())]),
     nk.PlanError, "shape"),
    ("steer-wrong-d-model", lambda e, t: e.m.run(TEXT, interventions=[nk.Steer("L1.resid_pre", torch.zeros(7))]),
     nk.PlanError, "does not broadcast"),
    ("steer-per-row-wrong-batch", lambda e, t: e.m.run(TEXT, interventions=[nk.Steer("L1.resid_pre", torch.zeros(3, 64))]),
     nk.PlanError, "per-row vector"),
    ("kvpatch-head-out-of-range", lambda e, t: e.m.run(TEXT, interventions=[nk.KVPatch(e.src, heads=[2])]),
     nk.SiteError, "KV heads"),
    ("kvpatch-layer-out-of-range", lambda e, t: e.m.run(TEXT, interventions=[nk.KVPatch(e.src, layers=[3])]),
     nk.SiteError, "layer 3"),
    ("knockout-head-out-of-range", lambda e, t: e.m.run(TEXT, interventions=[nk.Knockout(src=nk.Pos(1), dst=nk.Last(), heads=[4])]),
     nk.SiteError, "query heads"),
    ("knockout-every-key", lambda e, t: e.m.run(TEXT, interventions=[nk.Knockout(src=nk.Range(0, None), dst=nk.Last())]),
     NotekvError, "no key to attend"),
    ("hook-returns-int", lambda e, t: e.m.run(TEXT, interventions=[nk.Hook("L0.resid_pre", lambda x, hook: 3)]),
     nk.PlanError, "must return a tensor"),
    ("hook-returns-wrong-shape", lambda e, t: e.m.run(TEXT, interventions=[nk.Hook("L0.resid_pre", lambda x, hook: x[:, :1])]),
     nk.PlanError, "expected"),
    ("hook-not-callable", lambda e, t: nk.Hook("L0.resid_pre", 3), TypeError, "callable"),
    ("site-unknown", lambda e, t: e.m.run(TEXT, collect=["L0.nothing"]), nk.SiteError, "unknown site"),
    ("site-layer-out-of-range", lambda e, t: e.m.run(TEXT, collect=["L9.resid_pre"]), nk.SiteError, "out of range"),
    ("site-head-out-of-range", lambda e, t: e.m.run(TEXT, collect=["L0.attn.k.h7"]), nk.SiteError, "out of range"),
    ("site-head-on-residual", lambda e, t: nk.site("L0.resid_pre.h1"), nk.SiteError, "no head axis"),
    ("site-resid-mid-parallel", lambda e, t: tiny_model("gpt_neox").run("hi", collect=["L0.resid_mid"]), nk.SiteError,
     "parallel residual"),
    ("collect-glob-matches-nothing", lambda e, t: e.m.run(TEXT, collect="L*.nope"), nk.SiteError, "matches no site"),
    ("patch-source-missing-site", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L2.resid_pre", e.src, at=nk.Last())]),
     nk.SourceError, "collect it first"),
    ("patch-source-bad-type", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", "nope", at=nk.Last())]),
     TypeError, "source must be"),
    ("kvcache-as-patch-source-for-resid", lambda e, t: e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", e.src.kv, at=nk.Last())]),
     TypeError, "keys and values only"),
    ("kvpatch-bad-source", lambda e, t: e.m.run(TEXT, interventions=[nk.KVPatch(torch.zeros(3))]), TypeError, "KVPatch source"),
    ("interventions-not-interventions", lambda e, t: e.m.run(TEXT, interventions=["Patch"]), TypeError, "Interventions"),
    ("ablate-bad-kind", lambda e, t: nk.Ablate("L0.resid_pre", kind="median"), ValueError, "zero"),
    ("ablate-resample-without-reference", lambda e, t: nk.Ablate("L0.resid_pre", kind="resample"), ValueError, "reference"),
    ("kvpatch-bad-which", lambda e, t: nk.KVPatch(e.src, which="q"), ValueError, "which"),
    # -- 10: silent coercions refused
    ("run-logits-first", lambda e, t: e.m.run(TEXT, logits="first"), nk.InputError, "logits"),
    ("run-positions-huge", lambda e, t: e.m.run(TEXT, positions=10**6), nk.InputError, "outside"),
    ("run-positions-negative", lambda e, t: e.m.run(TEXT, positions=-50), nk.InputError, "outside"),
    ("run-positions-float", lambda e, t: e.m.run(TEXT, positions=1.5), nk.InputError, "whole number|integers"),
    ("run-positions-wrong-count", lambda e, t: e.m.run(TEXT, positions=[0, 1]), nk.InputError, "positions for"),
    ("generate-zero-tokens", lambda e, t: e.m.generate(TEXT, max_new_tokens=0), nk.InputError, "max_new_tokens"),
    ("reposition-fraction", lambda e, t: e.cache.reposition(1.7), nk.InputError, "whole number"),
    ("reposition-bool", lambda e, t: e.cache.reposition(True), nk.InputError, "whole number"),
    ("reposition-both", lambda e, t: e.cache.reposition(1, positions=[0]), nk.InputError, "exactly one"),
    ("reposition-float-positions", lambda e, t: e.cache.reposition(positions=torch.arange(len(e.cache)) + 0.5),
     nk.InputError, "integers"),
    ("reposition-past-the-model", lambda e, t: e.cache.reposition(10**7), nk.PositionError, "outside"),
    ("kvcache-patch-negative-slot", lambda e, t: e.run.kv.patch(e.src.kv, [-1]), nk.PositionError, "negative"),
    ("kvcache-patch-past-the-end", lambda e, t: e.run.kv.patch(e.src.kv, [999]), nk.PositionError, "outside"),
    ("kvcache-select-negative", lambda e, t: e.cache.select([-1]), nk.PositionError, "outside"),
    ("kvcache-drop-past-the-end", lambda e, t: e.cache.drop([10**4]), nk.PositionError, "outside"),
    ("kvcache-patch-bad-which", lambda e, t: e.run.kv.patch(e.src.kv, [1], which="x"), nk.InputError, "which"),
    ("kvcache-patch-bad-layer", lambda e, t: e.run.kv.patch(e.src.kv, [1], layers=[5]), nk.InputError, "layer"),
    ("kvcache-expand-batch-2", lambda e, t: e.cache.expand(2).expand(3), ValueError, "batch-1"),
    ("edit-value-none", lambda e, t: _ctx(e).edit("status", None), nk.EditError, "value=None"),
    ("edit-value-int", lambda e, t: _ctx(e).edit("status", 3), nk.EditError, "str"),
    ("edit-unknown-field", lambda e, t: _ctx(e).edit("nope", "x"), nk.EditError, "nope"),
    ("edit-unknown-mode", lambda e, t: _ctx(e).edit("status", "cancelled", mode="teleport"), NotekvError, "teleport"),
    # -- 5 and 9: skills, compose and splice
    ("compose-empty-prefix", lambda e, t: nk.compose(e.m, "", [], "x", engine="hf"), nk.InputError, "prefix is empty"),
    ("compose-empty-suffix", lambda e, t: nk.compose(e.m, "a", [], "", engine="hf"), nk.InputError, "suffix is empty"),
    ("compose-negative-seam", lambda e, t: nk.compose(e.m, "a", [], "x", seam=-1, engine="hf"), nk.InputError, "seam"),
    ("compose-skill-not-in-list", lambda e, t: nk.compose(e.m, "a", nk.Skill.compile(e.m, "b"), "x"), nk.InputError,
     "list of Skill"),
    ("compose-kvcache-as-skill", lambda e, t: nk.compose(e.m, "a", [e.cache], "x"), nk.InputError, "Skill objects"),
    ("compose-bad-engine", lambda e, t: nk.compose(e.m, "a", [], "x", engine="fast"), nk.InputError, "engine"),
    ("compose-bad-logits", lambda e, t: nk.compose(e.m, "a", [], "x", logits="first"), nk.InputError, "logits"),
    ("splice-no-parts", lambda e, t: nk.splice(e.m, []), nk.InputError, "at least one"),
    ("splice-a-string", lambda e, t: nk.splice(e.m, "abc"), nk.InputError, "list of parts"),
    ("splice-empty-text-part", lambda e, t: nk.splice(e.m, ["a", ""]), nk.InputError, "no tokens"),
    ("splice-negative-seam", lambda e, t: nk.splice(e.m, ["a", e.cache], seam=-2), nk.InputError, "seam"),
    ("splice-bad-part", lambda e, t: nk.splice(e.m, ["a", 3]), nk.InputError, "expected a KVCache"),
    ("splice-wrong-label-count", lambda e, t: nk.splice(e.m, ["a", e.cache], labels=["x"]), nk.InputError, "labels"),
    ("skill-empty-text", lambda e, t: nk.Skill.compile(e.m, ""), ValueError, "non-empty"),
    ("skill-bad-mode", lambda e, t: nk.Skill.compile(e.m, "a", mode="fancy"), ValueError, "mode"),
    ("store-bad-name", lambda e, t: nk.SkillStore(t / "st").get("../x", e.m), nk.InputError, "plain file name"),
    ("store-missing-skill", lambda e, t: nk.SkillStore(t / "st").get("nope", e.m), KeyError, "no skill"),
    # -- 4 and 7: files
    ("nkv-missing", lambda e, t: nk.KVCache.load(t / "none.nkv", e.m), nk.CacheFileError, "no cache file"),
    ("nkv-not-safetensors", lambda e, t: (t.joinpath("x.nkv").write_text("hello"), nk.KVCache.load(t / "x.nkv", e.m)),
     nk.CacheFileError, "not a readable"),
    ("nkv-header-max-positions-edited", lambda e, t: nk.KVCache.load(_edited_header(e, t, "max_positions", 7), e.m),
     nk.CacheFileError, "checksum"),
    ("nkv-header-rope-edited", lambda e, t: nk.KVCache.load(_edited_header(e, t, "rope", None), e.m),
     nk.CacheFileError, "checksum"),
    ("nkv-header-rope-edited-and-rehashed", lambda e, t: nk.KVCache.load(_edited_header(e, t, "rope", None, rehash=True), e.m),
     nk.CacheFileError, "RoPE"),
    ("nkv-header-max-positions-rehashed", lambda e, t: nk.KVCache.load(_edited_header(e, t, "max_positions", 7, rehash=True), e.m),
     nk.CacheFileError, "max_positions"),
    ("nkv-of-other-model", lambda e, t: nk.KVCache.load(_saved(e.other_run.kv, t), e.m), nk.CacheMismatchError, "another model"),
    ("sidecar-missing", lambda e, t: nk.Skill.load(_saved(e.cache, t), e.m), nk.CacheFileError, "metadata"),
    ("sidecar-truncated", lambda e, t: nk.Skill.load(_sidecar(e, t, lambda s: s[: len(s) // 2]), e.m), nk.CacheFileError,
     "not valid JSON"),
    ("sidecar-missing-name", lambda e, t: nk.Skill.load(_sidecar(e, t, lambda s: _drop_key(s, "name")), e.m),
     nk.CacheFileError, "name"),
    ("sidecar-text-tampered", lambda e, t: nk.Skill.load(_sidecar(e, t, lambda s: _set_key(s, "text", "Other text.")), e.m),
     nk.CacheFileError, "does not tokenize"),
    ("sidecar-mode-tampered", lambda e, t: nk.Skill.load(_sidecar(e, t, lambda s: _set_key(s, "mode", "isolated")), e.m),
     nk.CacheFileError, "edited mode"),
    ("sidecar-bad-mode", lambda e, t: nk.Skill.load(_sidecar(e, t, lambda s: _set_key(s, "mode", "weird")), e.m),
     nk.CacheFileError, "mode"),
    ("sidecar-wrong-format", lambda e, t: nk.Skill.load(_sidecar(e, t, lambda s: _set_key(s, "format", "x/1")), e.m),
     nk.CacheFileError, "not a notekv skill"),
    ("interventions-file-wrong-format", lambda e, t: nk.hooks.serialize.from_json({"format": "x"}, {}), ValueError,
     "not a notekv interventions"),
    ("interventions-file-unknown-type", lambda e, t: nk.hooks.serialize.from_json(
        {"format": "notekv.interventions/1", "interventions": [{"type": "Evil"}]}, {}), ValueError, "unknown intervention"),
    ("selector-json-unknown", lambda e, t: nk.hooks.positions.selector_from_json({"type": "Everything"}), ValueError,
     "unknown position selector"),
    # -- scenarios
    ("scenario-empty-values", lambda e, t: _scenario_file(t, GOOD_TOML.replace('["b"]', "[]")), NotekvError, "non-empty list"),
    ("scenario-string-values", lambda e, t: _scenario_file(t, GOOD_TOML.replace('["b"]', '"b"')), NotekvError, "list"),
    ("scenario-empty-string-value", lambda e, t: _scenario_file(t, GOOD_TOML.replace('["b"]', '[""]')), NotekvError,
     "non-empty"),
    ("scenario-negative-shots", lambda e, t: _scenario_file(t, GOOD_TOML + "shots = -2\n"), NotekvError, "shots"),
    ("scenario-unknown-key", lambda e, t: _scenario_file(t, GOOD_TOML + "colour = 1\n"), NotekvError, "unknown key"),
    ("scenario-not-toml", lambda e, t: _scenario_file(t, "name = "), NotekvError, "not valid TOML"),
    ("scenario-edit-table-incomplete", lambda e, t: _scenario_file(t, GOOD_TOML + "[edit]\nline = 'x'\n"), NotekvError,
     "edit"),
    ("sweep-unaligned", lambda e, t: nk.patch_sweep(e.m, TEXT, TEXT + " more", answers=(1, 2)), ValueError, "equal token length"),
    ("sweep-bad-site", lambda e, t: nk.patch_sweep(e.m, TEXT, OTHER, answers=(1, 2), site="attn.pattern"), ValueError, "site="),
    ("sweep-no-metric", lambda e, t: nk.patch_sweep(e.m, TEXT, OTHER), ValueError, "exactly one"),
    ("sweep-position-outside", lambda e, t: nk.patch_sweep(e.m, TEXT, OTHER, answers=(1, 2), slots=[-1]), IndexError,
     "slots"),
    ("sweep-identical-prompts-recovery", lambda e, t: nk.patch_sweep(e.m, TEXT, TEXT, answers=(1, 2), layers=[0]).recovery,
     ValueError, "does not move"),
]


def _saved(cache, t):
    p = t / "c.nkv"
    cache.save(p)
    return p


def _edited_header(e, t, key, value, rehash=False):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from notekv.kv.store import _header_digest

    p = _saved(e.cache, t)
    with safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["notekv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if key == "rope":
        meta["rope"][0]["inv_freq"][0] *= 2
    else:
        meta[key] = value
    if rehash:
        meta["header_sha256"] = _header_digest(meta)
    save_file(tensors, str(p), metadata={"notekv": json.dumps(meta)})
    return p


def _sidecar(e, t, change):
    skill = nk.Skill.compile(e.m, "Refunds within 30 days.\n", name="pol")
    p = skill.save(t / "pol.nkv")
    side = t / "pol.nkv.json"
    side.write_text(change(side.read_text()))
    return p


def _drop_key(text, key):
    d = json.loads(text)
    d.pop(key)
    return json.dumps(d)


def _set_key(text, key, value):
    d = json.loads(text)
    d[key] = value
    return json.dumps(d)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_misuse_gets_a_clear_error(case, tmp_path):
    _, fn, err, pattern = case
    e = env()
    hooks_before = count_hooks(e.m.hf)
    cache_keys = e.run.kv.keys.clone()
    with pytest.raises(err) as info:
        fn(e, tmp_path)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert not any(f.filename.endswith(("torch/nn/modules/module.py",)) for f in _frames(info)[-1:]), \
        "the error was raised deep inside torch, not at notekv's boundary"
    assert count_hooks(e.m.hf) == hooks_before  # nothing leaked
    assert e.m.hf.config._attn_implementation != "notekv"
    assert torch.equal(e.run.kv.keys, cache_keys)  # a shared cache is never mutated


def _frames(info):
    import traceback

    return traceback.extract_tb(info.tb)


# Inputs that look odd but have one right answer.
RIGHT = [
    ("pos-negative-counts-from-the-end", lambda e: _same(
        e.m.run(TEXT, interventions=[nk.Ablate("L1.resid_pre", at=nk.Pos(-1))]),
        e.m.run(TEXT, interventions=[nk.Ablate("L1.resid_pre", at=nk.Pos(e.n - 1))]))),
    ("last-equals-pos-minus-one-after-a-cache", lambda e: _same(
        e.m.run(" Yes.", past=e.run, interventions=[nk.Ablate("L1.resid_pre", at=nk.Last())]),
        e.m.run(" Yes.", past=e.run, interventions=[nk.Ablate("L1.resid_pre", at=nk.Pos(-1))]))),
    ("empty-pos-is-a-no-op", lambda e: _same(e.m.run(TEXT, interventions=[nk.Ablate("L1.resid_pre", at=nk.Pos())]),
                                              e.m.run(TEXT))),
    ("tuple-of-ids", lambda e: _same(e.m.run(tuple(e.run.ids[0].tolist())), e.run)),
    ("tensor-1d-ids", lambda e: _same(e.m.run(e.run.ids[0]), e.run)),
    ("kvpatch-source-equal-to-target", lambda e: _same(e.m.run(TEXT, interventions=[nk.KVPatch(e.run)]), e.run)),
    ("patch-source-equal-to-target", lambda e: _same(e.m.run(TEXT, interventions=[nk.Patch("L1.resid_pre", e.run)]), e.run)),
    ("reposition-zero", lambda e: torch.equal(e.cache.reposition(0).keys, e.cache.keys) or
     bool((e.cache.reposition(0).keys - e.cache.keys).abs().max() < 1e-6)),
    ("reposition-there-and-back", lambda e: bool((e.cache.reposition(40).reposition(-40).keys - e.cache.keys).abs().max() < 1e-5)),
    ("duplicate-skill-names-keep-every-span", lambda e: _dup_skills(e)),
    ("default-skill-name-is-a-digest", lambda e: nk.Skill.compile(e.m, "abc").name == nk.Skill.compile(e.m, "abc").name
     and nk.Skill.compile(e.m, "abc").name.startswith("skill-")),
    ("collect-twice-last-wins", lambda e: e.m.run(TEXT, collect=["L1.resid_pre"], interventions=[
        nk.Collect("L1.resid_pre", at=nk.Last())])["L1.resid_pre"].shape[1] == e.n),
]


def _same(a, b) -> bool:
    return torch.equal(a.logits, b.logits)


def _dup_skills(e) -> bool:
    sk = nk.Skill.compile(e.m, "Refunds within 30 days.\n", name="pol")
    c = nk.compose(e.m, "Customer.\n", [sk, sk], "Refund?", engine="hf")
    lean = nk.compose(e.m, "Customer.\n", [sk, sk], "Refund?", engine="lean")
    spans = list(c.spans)
    return spans == ["prefix", "pol", "pol#2", "suffix"] and list(lean.spans) == spans and \
        len(c.cache) == len(lean.cache) and bool((c.logits - lean.logits).abs().max() < 1e-4)


@pytest.mark.parametrize("case", RIGHT, ids=[c[0] for c in RIGHT])
def test_odd_but_valid_input_gets_the_right_answer(case):
    assert case[1](env())


# ---------------------------------------------------------------- threads and nesting
def test_two_threads_on_one_model_do_not_cross():
    model = nk.tiny("llama")
    vecs = [torch.full((64,), 3.0), torch.full((64,), -3.0)]
    want = [model.run(TEXT, interventions=[nk.Steer("L1.resid_pre", v)]).logits for v in vecs]
    got: dict = {}
    errors: list = []

    def work(i):
        try:
            for _ in range(5):
                out = model.run(TEXT, interventions=[nk.Steer("L1.resid_pre", vecs[i])],
                                collect=["L0.attn.pattern"])  # switches the attention function too
                got.setdefault(i, []).append(out.logits)
        except Exception as err:  # noqa: BLE001 - the test reports it
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert all(torch.allclose(x, want[i], atol=1e-5) for x in got[i])
    assert model.hf.config._attn_implementation != "notekv" and count_hooks(model.hf) == 0


def test_hook_contexts_exited_out_of_order_restore_the_model():
    model = nk.tiny("llama")
    plain = model.run(TEXT).logits
    ids = model.run(TEXT).ids
    a = model.hooks(nk.Collect("L0.attn.pattern"))
    b = model.hooks(nk.Collect("L1.attn.pattern"), nk.Collect("L0.kv.k"))
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first one out is not the last one in
    with torch.no_grad():
        model.hf(input_ids=ids)
    assert len(b.acts("L1.attn.pattern")) == 1 and len(b.acts("L0.kv.k")) == 1  # b still runs
    assert not a.acts("L0.attn.pattern") or len(a.acts("L0.attn.pattern")) == 0
    b.__exit__(None, None, None)
    assert model.hf.config._attn_implementation != "notekv" and count_hooks(model.hf) == 0
    assert torch.equal(model.run(TEXT).logits, plain)  # bit-identical to the model's own kernel again


def test_nested_contexts_on_one_cache_both_fire():
    model = nk.tiny("llama")
    ids = model.run(TEXT).ids
    with model.hooks(nk.Collect("L0.kv.k")) as outer, model.hooks(nk.Collect("L1.attn.k")) as inner:
        with torch.no_grad():
            model.hf(input_ids=ids)
    assert len(outer.acts("L0.kv.k")) == 1 and len(inner.acts("L1.attn.k")) == 1


def test_errors_share_one_base_class():
    for cls in (nk.SiteError, nk.SpanError, nk.SlotError, nk.PlanError, nk.CacheError, nk.CacheMismatchError,
                nk.CacheFileError, nk.PositionError, nk.UnsupportedRopeError, nk.UnsupportedArchitectureError,
                nk.LeanUnsupportedError, nk.EditError, nk.InputError, nk.ConcurrencyError):
        assert issubclass(cls, NotekvError), cls


CLI_CASES = [
    (["report", "--pairs", "0"], "--pairs: 0 is below the minimum 1"),
    (["report", "--pairs", "-3"], "below the minimum"),
    (["report", "--pairs", "ten"], "not a whole number"),
    (["report", "--act-pairs", "0"], "--act-pairs"),
    (["report", "--out", "/etc/hostname/sub"], "is a file, not a directory"),
    (["report", "--out", "/etc/hostname"], "not a directory"),
    (["report", "--model", "no-such-model"], "neither a bundled model"),
    (["report", "--scenario", "no-such-scenario"], "unknown scenario"),
    (["report", "--scenario", "/nonexistent/x.toml"], "no scenario file"),
    (["eval-edits", "--out", "/tmp/x", "--cases", "0"], "--cases"),
    (["eval-edits", "--out", "/tmp/x", "--min-swing", "nan"], "finite"),
    (["eval-edits", "--out", "/tmp/x", "--scenario", "nope"], "unknown scenario"),
    (["eval-edits", "--out", "/tmp/x", "--scenario", "agent_policy.toml"], "no scenario file|no \\[edit\\] table"),
    (["eval-compose", "--out", "/tmp/x", "--pairs", "0"], "--pairs"),
    (["eval-compose", "--out", "/tmp/x", "--turns", "-1"], "--turns"),
    (["eval-compose"], "--out"),
    (["report", "--dtype", "int8"], "--dtype: 'int8' is not a dtype; choose float32, bfloat16 or float16"),
    (["eval-edits", "--out", "/tmp/x", "--dtype", "half-ish"], "--dtype"),
    (["eval-compose", "--out", "/tmp/x", "--device", "gpu7"], "--device: 'gpu7': not a torch device"),
    *([(["report", "--device", "cuda"], "--device: 'cuda': CUDA is not available")] if not torch.cuda.is_available()
      else []),
    (["demo", "--model", "/nonexistent"], "neither a bundled model"),
    (["canaries", "--model", "x.gguf"], "neither a bundled model"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_refuses_bad_arguments_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    import notekv

    from notekv_cli import main

    monkeypatch.setattr(notekv, "load", lambda *a, **k: pytest.fail("a model was loaded before the arguments were checked"))
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_lean_compose_ignores_transformers_own_hooks_but_not_a_users():
    model = nk.tiny("llama")
    skill = nk.Skill.compile(model, "Refunds within 30 days.\n", name="pol")
    with torch.no_grad():  # transformers installs (and keeps) output-capturing hooks here
        model.hf(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert nk.compose(model, "Customer.\n", [skill], "Refund?", engine="lean").engine == "lean"
    handle = model.hf.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        with pytest.raises(ValueError, match="lean engine would bypass"):
            nk.compose(model, "Customer.\n", [skill], "Refund?", engine="lean")
    finally:
        handle.remove()
