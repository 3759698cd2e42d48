"""Property tests: KVCache operations never change their source and survive the store;
selectors resolve inside the prompt or raise; damaged files raise only CacheFileError."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import notekv as nk  # noqa: E402
from conftest import tiny_model  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))

_base: dict = {}


def base():
    if not _base:
        m = tiny_model("llama")
        _base["m"] = m
        _base["a"] = nk.KVCache.prefill(m, "Refunds within 30 days if unopened.")
        _base["b"] = nk.KVCache.prefill(m, "Refunds within 90 days if unopened.")
    return _base


def _snapshot(c: nk.KVCache):
    return (c.keys.clone(), c.values.clone(), c.positions.clone(), c.token_ids.clone(), c.segments,
            c.origin_keys.clone(), c.origin_positions.clone())


def _same(c: nk.KVCache, snap) -> bool:
    now = _snapshot(c)
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(now, snap))


OPS = st.lists(st.tuples(st.sampled_from(["select", "drop", "patch", "reposition", "concat", "relabel"]),
                         st.integers(0, 10**6)), min_size=1, max_size=6)


@SETTINGS
@given(OPS)
def test_random_kvcache_ops_never_mutate_their_source(ops):
    b = base()
    a, other = b["a"], b["b"]
    snaps = (_snapshot(a), _snapshot(other))
    cur = a
    for name, r in ops:
        n = len(cur)
        if name == "select" and n:
            cur = cur.select(sorted({r % n, (r // 7) % n}))
        elif name == "drop" and n > 1:
            cur = cur.drop([r % n])
        elif name == "patch" and n:
            cur = cur.patch(other.select(range(min(n, len(other)))) if len(other) >= n else other, [r % min(n, len(other))],
                            which=("k", "v", "kv")[r % 3])
        elif name == "reposition" and n:
            cur = cur.reposition(r % 50)
        elif name == "concat":
            cur = cur.concat(other.select([r % len(other)]))
        elif name == "relabel":
            cur = cur.relabel(f"seg{r % 3}")
    assert _same(a, snaps[0]) and _same(other, snaps[1])


@SETTINGS
@given(OPS)
def test_random_kvcaches_round_trip_through_the_store(ops):
    b = base()
    cur = b["a"]
    for name, r in ops:
        if name == "reposition":
            cur = cur.reposition(r % 50)
        elif name == "select" and len(cur) > 1:
            cur = cur.select(range(r % len(cur), len(cur)))
        elif name == "relabel":
            cur = cur.relabel(f"s{r % 5}")
    path = Path(tempfile.mkdtemp()) / "c.nkv"
    cur.save(path)
    back = nk.KVCache.load(path, b["m"])
    assert torch.equal(back.keys, cur.keys) and torch.equal(back.values, cur.values)
    assert torch.equal(back.positions, cur.positions) and back.segments == cur.segments
    assert torch.equal(back.origin_keys, cur.origin_keys) and torch.equal(back.origin_positions, cur.origin_positions)


SELECTORS = st.one_of(
    st.builds(lambda xs: nk.Pos(*xs), st.lists(st.integers(-60, 60), max_size=4)),
    st.builds(nk.Range, st.integers(-40, 40), st.one_of(st.none(), st.integers(-40, 40))),
    st.just(nk.Last()),
    st.builds(nk.Span, st.sampled_from(["status", "Refund", "zzz", "s: s", ""]), st.integers(-2, 2)),
    st.builds(lambda s: nk.After(nk.Span(s)), st.sampled_from(["status", "Refund?", "nope"])),
    st.just(nk.Delims()),
)


@SETTINGS
@given(SELECTORS)
def test_random_selectors_resolve_inside_the_prompt_or_raise(sel):
    m = base()["m"]
    text = "order_status: shipped. Refund?"
    n = len(m.tokenize(text))
    try:
        run = m.run(text, interventions=[nk.Ablate("L1.resid_pre", at=sel)], collect=["L1.resid_pre"])
    except (nk.SlotError, nk.SpanError):
        return
    slots = sel.resolve(m.tokenize(text))
    assert all(0 <= s < n for s in slots)
    zeroed = (run["L1.resid_pre"][0].abs().sum(-1) == 0).nonzero().flatten().tolist()
    assert set(slots) <= set(zeroed)  # every resolved slot was really ablated


@SETTINGS
@given(st.integers(0, 10**9), st.sampled_from(["flip", "truncate"]), st.sampled_from(["nkv", "sidecar"]))
def test_damaged_files_raise_only_cache_file_errors(r, how, which):
    b = base()
    d = Path(tempfile.mkdtemp())
    skill = nk.Skill.compile(b["m"], "Refunds within 30 days.\n", name="pol")
    path = skill.save(d / "pol.nkv")
    target = path if which == "nkv" else d / "pol.nkv.json"
    data = bytearray(target.read_bytes())
    if how == "flip":
        i = r % len(data)
        data[i] ^= 1 << (r % 8)
    else:
        data = data[: r % len(data)]
    target.write_bytes(bytes(data))
    try:
        back = nk.Skill.load(path, b["m"])
    except nk.CacheFileError:
        return
    # A change the checks cannot see must leave the skill's computation as it was.
    assert back.token_ids == skill.token_ids and torch.equal(back.cache.keys, skill.cache.keys)
    assert torch.equal(back.cache.positions, skill.cache.positions)
