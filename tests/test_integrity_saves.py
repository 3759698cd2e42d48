"""Saves are all-or-nothing and explicit about overwriting; every stored cache gets the same
checks whatever holds it; a serialized Run source keeps its slots; forged files raise
notekv's errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import notekv as nk
from notekv.kv import CacheFileError, KVCache, atomic
from notekv.kv.atomic import OverwriteError, SaveError
from notekv.kv.store import _digest, _header_digest, save_cache

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\..+\.(w[0-9a-f]{12}|[0-9a-f]{16})\.tmp")


@pytest.fixture(scope="module")
def m():
    return nk.tiny("llama")


@pytest.fixture(scope="module")
def past(m):
    return KVCache.prefill(m, "hello there friend", segment="ctx")


def _versions(m, past):
    """Two different contents of each kind of save: cache, skill, interventions."""
    g = torch.Generator().manual_seed(0)
    caches = [past, past.reposition(3)]
    skills = [nk.Skill.compile(m, "Refunds within 30 days.\n", name="pol"),
              nk.Skill.compile(m, "No refunds after opening.\n", name="pol")]
    ivs = [[nk.Steer("L1.resid_pre", torch.randn(64, generator=g), at=nk.Last()), nk.KVPatch(c, at=nk.Pos(1)),
            nk.Patch("L0.attn.z.h1", torch.randn(1, 5, 16, generator=g), at=nk.Last())] for c in caches]
    return {"cache": caches, "skill": skills, "ivs": ivs}


def _files(d: Path) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(d))
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


# --------------------------------------------------------------------------- kills
CHILD = textwrap.dedent('''
    import os, random, signal, sys, time
    from pathlib import Path
    import torch
    import notekv as nk
    from notekv.kv import atomic
    from notekv.kv.store import save_cache

    versions, work, kills, seed = torch.load(sys.argv[1], weights_only=False), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    SAVE = {"cache": lambda v, p, o: save_cache(v, p / "x.nkv", overwrite=o),
            "skill": lambda v, p, o: v.save(p / "x.nkv", overwrite=o),
            "ivs": lambda v, p, o: nk.save_interventions(v, p / "x.json", overwrite=o)}

    def slow(f):  # widen every step of a save so that kills land inside it
        return lambda *a: (time.sleep(0.003), f(*a))[1]

    for name in ("_fsync_file", "_fsync_dir", "_replace"):
        setattr(atomic, name, slow(getattr(atomic, name)))
    write_temporary = atomic.write_temporary

    def half_then_all(target, write, what="path"):  # a kill here leaves a half-written temporary
        def w(tmp):
            write(tmp)
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            time.sleep(0.003)
            tmp.write_bytes(data)
        return write_temporary(target, w, what)

    atomic.write_temporary = half_then_all
    rng = random.Random(seed)
    for kind, (a, b) in versions.items():
        t0 = time.perf_counter()
        SAVE[kind](a, work / f"{kind}-probe", False)
        cycle = time.perf_counter() - t0
        for k in range(kills):
            d = work / f"{kind}-{k}"
            SAVE[kind](a, d, False)
            pid = os.fork()
            if pid == 0:
                i = 1
                while True:
                    SAVE[kind]((a, b)[i % 2], d, True)
                    i += 1
            time.sleep(rng.uniform(0, 2.5 * cycle))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
''')


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")
def test_a_killed_save_leaves_the_old_or_the_new_pair_never_a_mix(m, past, tmp_path):
    versions = _versions(m, past)
    versions = {k: (v[0], v[1]) for k, v in versions.items()}
    torch.save(versions, tmp_path / "versions.pt")
    work = tmp_path / "work"
    kills = 8
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "versions.pt"), str(work), str(kills), "23"],
                   check=True, cwd=ROOT, timeout=120)
    expected = {"cache": ["x.nkv"], "skill": ["x.nkv", "x.nkv.json"], "ivs": ["x.json", "x.json.safetensors"]}
    seen = {"old": 0, "new": 0, "debris": 0}
    for kind, (a, b) in versions.items():
        for k in range(kills):
            d = work / f"{kind}-{k}"
            visible, hidden = _files(d)
            assert visible == expected[kind], (kind, k, visible)
            assert all(TEMP.fullmatch(h) for h in hidden), hidden  # only a killed save's hidden temporaries
            seen["debris"] += bool(hidden)
            got = _which(kind, d, m, a, b)
            seen[got] += 1
            # The next save of the same path leaves the pair and nothing else.
            _save(kind, a, d, overwrite=True)
            assert _files(d) == (expected[kind], [])
            assert _which(kind, d, m, a, b) == "old"
    assert seen["old"] and seen["new"] and seen["debris"], seen  # the kills landed before, inside and after saves


def _save(kind, v, d, overwrite=False):
    if kind == "cache":
        return save_cache(v, d / "x.nkv", overwrite=overwrite)
    if kind == "skill":
        return v.save(d / "x.nkv", overwrite=overwrite)
    return nk.save_interventions(v, d / "x.json", overwrite=overwrite)


def _which(kind, d, m, a, b) -> str:
    """'old' or 'new': which complete version the files at ``d`` load as (anything else fails)."""
    if kind == "cache":
        got = KVCache.load(d / "x.nkv", m)
        match = [torch.equal(got.keys, v.keys) and torch.equal(got.positions, v.positions) for v in (a, b)]
    elif kind == "skill":
        got = nk.Skill.load(d / "x.nkv", m)
        match = [got.text == v.text and torch.equal(got.cache.keys, v.cache.keys) for v in (a, b)]
    else:
        got = nk.load_interventions(d / "x.json", m)
        match = [torch.equal(got[0].vector, v[0].vector) and torch.equal(got[1].source.keys, v[1].source.keys)
                 and torch.equal(got[2].source, v[2].source) for v in (a, b)]
    assert sum(match) == 1, (kind, match)
    return "old" if match[0] else "new"


@pytest.mark.parametrize("kind", ["cache", "skill", "ivs"])
def test_a_failed_save_removes_its_temporaries_and_keeps_the_old_pair(kind, m, past, tmp_path, monkeypatch):
    a, b = _versions(m, past)[kind]
    _save(kind, a, tmp_path)
    before = _files(tmp_path)
    real = atomic._fsync_file
    calls = []
    last = 1 if kind == "cache" else 2  # the main file's flush (a pair writes its sidecar first)

    def full_disk(path):
        calls.append(path)
        if len(calls) == last:
            raise OSError(28, "No space left on device")
        real(path)

    monkeypatch.setattr(atomic, "_fsync_file", full_disk)
    with pytest.raises(SaveError, match="No space left"):
        _save(kind, b, tmp_path, overwrite=True)
    assert _files(tmp_path) == before
    assert _which(kind, tmp_path, m, a, b) == "old"


@pytest.mark.parametrize("kind", ["skill", "ivs"])
def test_a_pair_committed_before_its_sidecar_moved_loads_as_the_new_pair(kind, m, past, tmp_path, monkeypatch):
    a, b = _versions(m, past)[kind]
    _save(kind, a, tmp_path)
    real = atomic._replace
    calls = []

    def stop_after_commit(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # sidecar temporary -> waiting name, main commit, then this: the sidecar move
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(atomic, "_replace", stop_after_commit)
    with pytest.raises(SaveError, match="sidecar stayed"):
        _save(kind, b, tmp_path, overwrite=True)
    monkeypatch.setattr(atomic, "_replace", real)
    assert len(_files(tmp_path)[1]) == 1  # the committed sidecar, waiting under its hidden name
    assert _which(kind, tmp_path, m, a, b) == "new"  # found there and moved into place
    assert _files(tmp_path)[1] == []


# --------------------------------------------------------------------------- overwrite
@pytest.mark.parametrize("kind", ["cache", "skill", "ivs"])
def test_overwrite_is_explicit_and_an_identical_save_is_fine(kind, m, past, tmp_path):
    a, b = _versions(m, past)[kind]
    _save(kind, a, tmp_path)
    _save(kind, a, tmp_path)  # the same content again
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OverwriteError, match="overwrite=True") as err:
        _save(kind, b, tmp_path)
    assert isinstance(err.value, nk.InputError) and isinstance(err.value, FileExistsError)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _which(kind, tmp_path, m, a, b) == "old"
    _save(kind, b, tmp_path, overwrite=True)
    assert _which(kind, tmp_path, m, a, b) == "new"
    assert _files(tmp_path)[1] == []


def test_kvcache_save_and_store_entries_refuse_different_content(m, past, tmp_path):
    p = past.save(tmp_path / "c.nkv")
    past.save(p)
    with pytest.raises(OverwriteError, match="different content"):
        past.reposition(2).save(p)
    a, b = _versions(m, past)["skill"]
    store = nk.SkillStore(tmp_path / "store")
    store.put(a)
    store.put(a)
    with pytest.raises(OverwriteError, match="skill 'pol' is already in"):
        store.put(b)
    assert store.get("pol", m).text == a.text
    store.put(b, overwrite=True)
    assert store.get("pol", m).text == b.text and store.names() == ["pol"]


# --------------------------------------------------------------------------- Run sources
def test_a_run_that_continued_a_cache_round_trips_with_its_start(m, past, tmp_path):
    src = m.run(" and more words", past=past, collect=["L1.resid_pre", "L0.attn_out"])
    assert src.start == len(past) > 0
    ivs = [nk.Patch("L1.resid_pre", src, at=nk.Last()), nk.Patch("L0.attn_out", src, at=nk.Pos(len(past) + 2)),
           nk.KVPatch(src, at=nk.Pos(1, len(past) + 1))]
    want = m.run(" and mxre words", past=past, interventions=ivs).logits
    nk.save_interventions(ivs, tmp_path / "ivs.json")
    for model in (None, m):
        back = nk.load_interventions(tmp_path / "ivs.json") if model is None else \
            nk.load_interventions(tmp_path / "ivs.json", model)  # checked against the model now
        run = back[0].source
        assert run is back[1].source is back[2].source and run.start == src.start
        assert torch.equal(run.ids, src.ids) and run.view == src.view and run.fingerprint == src.fingerprint
        assert sorted(run.acts) == sorted(src.acts) and all(torch.equal(run.acts[k], src.acts[k]) for k in src.acts)
        kv = run.kv
        assert torch.equal(kv.positions, src.kv.positions) and torch.equal(kv.token_ids, src.kv.token_ids)
        assert kv.segments == src.kv.segments == ("ctx",) * len(past) + ("",) * (len(src.kv) - len(past))
        got = m.run(" and mxre words", past=past, interventions=back).logits
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- one set of checks
def _forge(meta: dict, how: str) -> dict:
    meta = json.loads(json.dumps(meta))
    if how == "zero-rope":
        for r in meta["rope"]:
            r["inv_freq"] = [0.0] * len(r["inv_freq"])
    elif how == "huge-max-positions":
        meta["max_positions"] = 10**9
    meta["header_sha256"] = _header_digest(meta)  # a forger rehashes the header
    return meta


def _forged_nkv(past, path: Path, how: str) -> Path:
    save_cache(past, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["notekv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if how == "edited-tensor":
        tensors["keys"] = tensors["keys"].clone()
        tensors["keys"][0, 0, 0, 0, 0] += 1
    else:
        meta = _forge(meta, how)
    save_file(tensors, str(path), metadata={"notekv": json.dumps(meta)})
    return path


def _forged_json(past, path: Path, how: str, repair_pair: bool = True) -> Path:
    nk.save_interventions([nk.Steer("L1.resid_pre", torch.ones(64)), nk.KVPatch(past, at=nk.Pos(1))], path)
    doc = json.loads(path.read_text())
    side = Path(str(path) + ".safetensors")
    if how == "edited-tensor":
        tensors = load_file(str(side))
        tensors["1/source/keys"][0, 0, 0, 0, 0] += 1
        save_file(tensors, str(side))
        if repair_pair:  # the file-level pair record is rewritten too: only the cache's checksums can tell
            from notekv.hooks.serialize import _tensors_digest

            doc["tensors_sha256"] = _tensors_digest(tensors)
    else:
        doc["interventions"][1]["source"]["meta"] = _forge(doc["interventions"][1]["source"]["meta"], how)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("how,pattern", [("zero-rope", "RoPE specs differ"), ("huge-max-positions", "max_positions"),
                                         ("edited-tensor", "checksum mismatch for 'keys'")])
def test_a_cache_inside_interventions_gets_the_nkv_checks(how, pattern, m, past, tmp_path):
    with pytest.raises(CacheFileError, match=pattern) as in_nkv:
        KVCache.load(_forged_nkv(past, tmp_path / "c.nkv", how), m)
    path = _forged_json(past, tmp_path / "ivs.json", how)
    with pytest.raises(CacheFileError, match=pattern) as in_json:
        nk.load_interventions(path, m)
    # The same check, the same words: only the container's name differs.
    assert str(in_json.value).split(f"{path}: the cache at '1/source'")[1] == str(in_nkv.value).split(str(tmp_path / "c.nkv"))[1]
    if how == "edited-tensor":
        with pytest.raises(CacheFileError, match=pattern):  # checksums need no model
            nk.load_interventions(path)
        with pytest.raises(nk.InputError, match="does not match"):  # nor does the pair record
            nk.load_interventions(_forged_json(past, tmp_path / "b.json", how, repair_pair=False))
    else:  # loaded without a model: checked when the cache meets one
        back = nk.load_interventions(path)
        with pytest.raises(CacheFileError, match=pattern):
            m.run("hello there friend", interventions=back[1:])
        with pytest.raises(CacheFileError, match=pattern):
            m.run(" more", past=back[1].source)


def test_a_cache_inside_interventions_of_another_model_is_refused_at_load(m, tmp_path):
    other = nk.tiny("llama", seed=1)
    nk.save_interventions([nk.KVPatch(KVCache.prefill(other, "abc"), at=1)], tmp_path / "ivs.json")
    with pytest.raises(nk.CacheMismatchError, match="another model"):
        nk.load_interventions(tmp_path / "ivs.json", m)


# --------------------------------------------------------------------------- forged files
def _edit_header(past, path: Path, change) -> Path:
    save_cache(past, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["notekv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    meta["header_sha256"] = _header_digest(meta)
    save_file(tensors, str(path), metadata={"notekv": json.dumps(meta)})
    return path


def _retype(name, dtype):
    def change(meta, tensors):
        tensors[name] = tensors[name].to(dtype)
        meta["sha256"][name] = _digest(tensors[name])
    return change


def _reshape(name):
    def change(meta, tensors):
        tensors[name] = tensors[name][None]
        meta["sha256"][name] = _digest(tensors[name])
    return change


FORGED = [
    ("no-tensor-checksums", lambda meta, t: meta.pop("sha256"), "lacks 'sha256'"),
    ("no-fingerprint", lambda meta, t: meta.pop("fingerprint"), "lacks 'fingerprint'"),
    ("no-segments", lambda meta, t: meta.pop("segments"), "lacks 'segments'"),
    ("no-rope", lambda meta, t: meta.pop("rope"), "lacks 'rope'"),
    ("checksums-not-a-map", lambda meta, t: meta.update(sha256=["x"]), "'sha256' is a list"),
    ("max-positions-text", lambda meta, t: meta.update(max_positions="64"), "'max_positions' is a str"),
    ("segments-numbers", lambda meta, t: meta.update(segments=list(range(len(meta["segments"])))), "segment labels"),
    ("rope-not-specs", lambda meta, t: meta.update(rope=[1, 2]), "RoPE specs are malformed"),
    ("unknown-tensor", lambda meta, t: (t.update(evil=torch.zeros(1)), meta["sha256"].update(evil=_digest(torch.zeros(1)))),
     "optionally origin_keys"),
    ("positions-float", _retype("positions", torch.float32), "positions is torch.float32"),
    ("keys-int", _retype("keys", torch.int64), "keys is torch.int64"),
    ("token-ids-2d", _reshape("token_ids"), r"token_ids is torch.int64 of shape \(1,"),
    ("keys-6d", _reshape("keys"), "floating \\[layers"),
]


@pytest.mark.parametrize("case", FORGED, ids=[c[0] for c in FORGED])
def test_a_forged_nkv_header_raises_a_cache_file_error(case, m, past, tmp_path):
    _, change, pattern = case
    path = _edit_header(past, tmp_path / "c.nkv", change)
    with pytest.raises(CacheFileError, match=pattern):
        KVCache.load(path, m)


def test_a_header_without_its_own_checksum_names_the_key(m, past, tmp_path):
    path = tmp_path / "c.nkv"
    save_cache(past, path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["notekv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("header_sha256")
    save_file(tensors, str(path), metadata={"notekv": json.dumps(meta)})
    with pytest.raises(CacheFileError, match="lacks 'header_sha256'"):
        KVCache.load(path, m)


def test_saving_onto_a_directory_names_the_path(m, past, tmp_path):
    d = tmp_path / "somewhere"
    d.mkdir()
    skill = _versions(m, past)["skill"][0]
    for save in (lambda: past.save(d), lambda: save_cache(past, d), lambda: skill.save(d),
                 lambda: nk.save_interventions([nk.Steer("L1.resid_pre", torch.ones(64))], d)):
        with pytest.raises(nk.InputError, match=re.escape(f"path={str(d)!r} is a directory")):
            save()
    assert os.listdir(d) == []
    (tmp_path / "x.json.safetensors").mkdir()
    with pytest.raises(nk.InputError, match="sidecar path .* is a directory"):
        nk.save_interventions([nk.Steer("L1.resid_pre", torch.ones(64))], tmp_path / "x.json")
    with pytest.raises(CacheFileError, match="is a directory"):
        KVCache.load(d, m)
    with pytest.raises(nk.InputError, match="is a directory"):
        nk.load_interventions(d)


def _ivs(path: Path, past) -> Path:
    nk.save_interventions([nk.Steer("L1.resid_pre", torch.ones(64)), nk.KVPatch(past, at=nk.Pos(1))], path)
    return path


def _doc_edit(change):
    def edit(path: Path):
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return edit


BAD_IVS = [
    ("truncated-json", lambda p: p.write_text(p.read_text()[:40]), "not a notekv interventions document"),
    ("truncated-tensors", lambda p: Path(str(p) + ".safetensors").write_bytes(Path(str(p) + ".safetensors").read_bytes()[:50]),
     "not readable"),
    ("missing-tensors", lambda p: Path(str(p) + ".safetensors").unlink(), "is missing"),
    ("no-interventions-list", _doc_edit(lambda d: d.pop("interventions")), "'interventions' is missing"),
    ("item-not-an-object", _doc_edit(lambda d: d["interventions"].append(3)), "unknown intervention type"),
    ("tensor-path-unknown", _doc_edit(lambda d: d["interventions"][0]["vector"].update(tensor="nope")), "malformed"),
    ("cache-meta-missing", _doc_edit(lambda d: d["interventions"][1]["source"].pop("meta")), "malformed"),
    ("cache-header-key-missing", _doc_edit(lambda d: d["interventions"][1]["source"]["meta"].pop("sha256")),
     "lacks 'sha256'"),
    ("pair-record-edited", _doc_edit(lambda d: d.update(tensors_sha256=3)), "'tensors_sha256' is 3"),
    ("run-start-negative", None, "Run start"),
]


@pytest.mark.parametrize("case", BAD_IVS, ids=[c[0] for c in BAD_IVS])
def test_a_forged_interventions_file_raises_a_notekv_error(case, m, past, tmp_path):
    name, edit, pattern = case
    if name == "run-start-negative":
        path = tmp_path / "ivs.json"
        nk.save_interventions([nk.Patch("L1.resid_pre", m.run("hello", collect=["L1.resid_pre"]), at=nk.Last())], path)
        edit = _doc_edit(lambda d: d["interventions"][0]["source"].update(start=-3))
    else:
        path = _ivs(tmp_path / "ivs.json", past)
    edit(path)
    with pytest.raises(nk.NotekvError, match=pattern):
        nk.load_interventions(path, m)


def test_a_sidecar_of_another_save_is_refused_and_a_renamed_pair_loads(m, past, tmp_path):
    a = nk.Skill.compile(m, "Refunds within 30 days.\n", name="pol")
    a.save(tmp_path / "a.nkv")
    nk.Skill.compile(m, "Refunds within 30 days.\n", name="other").save(tmp_path / "b.nkv")
    (tmp_path / "a.nkv.json").write_bytes((tmp_path / "b.nkv.json").read_bytes())  # same text, another skill
    with pytest.raises(CacheFileError, match="does not belong to"):
        nk.Skill.load(tmp_path / "a.nkv", m)
    v1, v2 = _versions(m, past)["ivs"]
    nk.save_interventions(v1, tmp_path / "a.json")
    nk.save_interventions(v2, tmp_path / "b.json")
    os.replace(tmp_path / "b.json.safetensors", tmp_path / "a.json.safetensors")
    with pytest.raises(nk.InputError, match="does not match"):
        nk.load_interventions(tmp_path / "a.json")
    # Moving a pair together keeps it a pair.
    os.replace(tmp_path / "b.nkv", tmp_path / "c.nkv")
    os.replace(tmp_path / "b.nkv.json", tmp_path / "c.nkv.json")
    assert nk.Skill.load(tmp_path / "c.nkv", m).name == "other"
    nk.save_interventions(v2, tmp_path / "b.json")
    os.replace(tmp_path / "b.json", tmp_path / "d.json")
    os.replace(tmp_path / "b.json.safetensors", tmp_path / "d.json.safetensors")
    assert torch.equal(nk.load_interventions(tmp_path / "d.json")[0].vector, v2[0].vector)
