"""The circuit report against prompt length, and KV patching against the number of rows:
time and peak memory of every report stage, with fitted growth exponents.

Lengths: the ``refund`` scenario on SmolLM2-135M with few-shot examples added until each
prompt holds at most N tokens (``Scenario.fit``: the examples come before the field, so the
field and what follows it stay the scenario's own), N = 256 ... 8192. One
:meth:`circuits.report.CircuitReport.build` per length (small: ``--pairs 6 --act-pairs 2
--heatmap-pairs 1``, ``screen="swing"`` so that the stages run whether or not pairs flip),
each in its own subprocess so that every length's peak is its own.

Stages: those ``CircuitReport.build`` runs and times (``prefill`` = scenario, pairs, prefill
and screening; then each ``circuits.report._stage_*`` function it calls, named by the
report's ``timings``: kv_patching, notes_knockout, attention_mass, activation_patching,
read_heads, write_direction, and any stage added since). Time: the report's own
``timings``. Memory: the process's resident set size (RSS) read from ``/proc/self/statm`` by
a thread every 5 ms; per stage its maximum (``peak_gb``) and that maximum less the RSS
before the build (``working_gb``: what the process holds beyond the loaded model while the
stage runs, including what earlier stages still hold and what the allocator has not returned
to the system). ``max_rss_gb`` is the subprocess's ``resource.getrusage(...).ru_maxrss``
(its whole life, model loading included). torch's CPU tensors are not seen by
``tracemalloc``, hence RSS. The machine's 1-minute load average is recorded before and after
each length: times taken beside other work are longer than the computation alone.

Rows: at one length (``--rows-length``, default 2048), ``circuits.pairstate.decide`` on R
patch rows (one downstream slot each, all layers), R = 4 ... 128, under the default byte
budget (``notekv.kv.cache.KV_BUDGET``, 1 GiB) and under an unbounded budget (the former
fixed chunk of 48 rows): seconds and working memory per call.

Growth exponent: the least-squares slope of log(y) on log(x) (x = mean prompt tokens, or
rows) for time and for working memory (points with y <= 0 left out). Prints tables and
writes ``benchmarks/results/scaling-<device>.json``.

    python benchmarks/scaling.py                       # SmolLM2-135M (CPU, 2 threads: hours)
    python benchmarks/scaling.py --toy --in-process    # tiny llama, seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch

from timing import write_result

STAGE_PREFIX = "_stage_"  # the report's stage functions in circuits.report
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
ROWS = (4, 8, 16, 32, 64, 128)
TOY_LENGTHS = (96, 192)
TOY_ROWS = (2, 4, 8)
GB = 1e9
TOY_TOML = textwrap.dedent('''
    name = "toy_gate"
    kind = "gate"
    field = "status"
    positive_values = ["good"]
    negative_values = ["bad!", "lost"]
    answers = { positive = "Y", negative = "N" }
    policy = "Allow only if status is good."
    shots = 2
    example = "#{id} status: {value}. go -> {answer}\\n"
    query = "#{id} status: {value}. go ->"
''')


class RssSampler:
    """This process's resident set size, sampled by a thread every ``interval`` seconds.
    ``mark(name)`` closes the open section (its seconds, start and peak RSS) and opens
    ``name``; ``mark(None)`` closes the last one."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.sections: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._name: str | None = None
        self._start = self._peak = 0
        self._t = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = self.rss()
            with self._lock:
                self._peak = max(self._peak, r)
            time.sleep(self.interval)

    def mark(self, name: str | None) -> None:
        now, r = time.perf_counter(), self.rss()
        with self._lock:
            if self._name is not None:
                self.sections[self._name] = {"seconds": now - self._t, "start_bytes": self._start,
                                             "peak_bytes": max(self._peak, r)}
            self._name, self._t, self._start, self._peak = name, now, r, r

    def close(self) -> None:
        self.mark(None)
        self._stop.set()
        self._thread.join()


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of log(y) on log(x), over the points with x, y > 0 (None if < 2)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def _setup(toy: bool):
    """The model and the scenario (a built-in name, or the toy scenario's file)."""
    import notekv as nk

    if not toy:
        return nk.load("smollm2-135m"), "refund"
    from circuits import report

    report.MIN_SWING = float("-inf")  # the random tiny model barely moves: every pair counts, every stage runs
    path = Path(tempfile.mkdtemp(prefix="notekv-scaling-")) / "toy_gate.toml"
    path.write_text(TOY_TOML)
    return nk.tiny("llama"), str(path)


# ---------------------------------------------------------------------- one length
def run_length(n: int, *, toy: bool, pairs: int, act_pairs: int, heatmap_pairs: int, seed: int = 0) -> dict:
    """One report at prompts of at most ``n`` tokens: per-stage seconds and RSS peaks."""
    from circuits import report, scenarios

    model, scenario = _setup(toy)
    sc, _ = scenarios.get(scenario).usable(model)
    lengths = [p.n for p in sc.pairs(model, pairs, seed=seed, context_tokens=n)]
    sampler = RssSampler()
    originals = {a: getattr(report, a) for a in dir(report)
                 if a.startswith(STAGE_PREFIX) and callable(getattr(report, a))}
    called: list[str] = []  # stage functions in the order the build calls them
    for attr, fn in originals.items():
        def timed(b, fn=fn, attr=attr):
            called.append(attr)
            sampler.mark(attr)
            return fn(b)
        setattr(report, attr, timed)
    load = os.getloadavg()[0]
    base = sampler.rss()
    sampler.mark("prefill")
    try:
        rep = report.CircuitReport.build(model, scenario, pairs=pairs, seed=seed, act_pairs=act_pairs,
                                         heatmap_pairs=heatmap_pairs, screen="swing", context_tokens=n,
                                         progress=False)
    finally:
        sampler.close()
        for attr, fn in originals.items():
            setattr(report, attr, fn)
    d = rep.data
    timings = d.get("timings", {"prefill": round(d["seconds"], 2)})
    names = list(timings)  # prefill, then the stages in the order they ran
    if len(names) != len(called) + 1:
        raise SystemExit(f"the report timed {names} but called {called}: stages and timings disagree")
    stages = {}
    for name, attr in zip(names, ["prefill", *called]):
        sec = sampler.sections[attr]
        stages[name] = {"seconds": timings[name], "peak_gb": sec["peak_bytes"] / GB,
                        "working_gb": (sec["peak_bytes"] - base) / GB}
    return {"context_tokens": n, "prompt_tokens": {"mean": sum(lengths) / len(lengths), "min": min(lengths),
                                                   "max": max(lengths)},
            "n_pairs": d["n_pairs"], "n_used": d["n_used"], "n_evaluation": d["n_evaluation"],
            "act_pairs": act_pairs, "heatmap_pairs": heatmap_pairs, "stages": stages,
            "base_gb": base / GB, "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
            "seconds": d["seconds"], "timings": timings, "loadavg_1min": [load, os.getloadavg()[0]],
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------- rows through decide
def run_rows(n: int, rows, *, toy: bool, seed: int = 0) -> dict:
    """``decide`` on ``rows`` patch rows at prompts of at most ``n`` tokens, under the default
    budget and an unbounded one (the former fixed 48-row chunk)."""
    from circuits import scenarios
    from circuits.pairstate import decide, prefill_pair, rows_per_chunk, slot_mask

    model, scenario = _setup(toy)
    sc, _ = scenarios.get(scenario).usable(model)
    st = prefill_pair(model, sc.fit(model, n, seed).pair(model, seed))
    down = list(range(min(st.pair.span_slots), st.n_ctx))
    arms = {"budget": None, "unbounded": 1 << 62}
    decide(model, st, torch.stack([slot_mask(st, [down[0]])] * 2))  # warm-up
    sampler = RssSampler()
    out = []
    for arm, budget in arms.items():
        for r in rows:
            masks = torch.stack([slot_mask(st, [down[i % len(down)]]) for i in range(r)])
            sampler.mark(f"{arm}/{r}")
            decide(model, st, masks, budget=budget)
            sampler.mark(None)
            sec = sampler.sections[f"{arm}/{r}"]
            out.append({"arm": arm, "rows": r, "rows_per_step": rows_per_chunk(st.old, budget),
                        "seconds": sec["seconds"], "working_gb": (sec["peak_bytes"] - sec["start_bytes"]) / GB})
    sampler.close()
    return {"context_tokens": n, "prompt_tokens": st.pair.n, "row_bytes": st.old.row_bytes, "rows": out,
            "loadavg_1min": os.getloadavg()[0]}


# ---------------------------------------------------------------------- driver
def _in_subprocess(args_list: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *args_list, "--worker-out", str(out)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], text=True, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args_list)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def stage_names(per_length: list[dict]) -> list[str]:
    """Every stage measured at some length, in the order they ran."""
    return list(dict.fromkeys(s for row in per_length for s in row["stages"]))


def _table(result: dict) -> None:
    lengths = result["lengths"]
    names = stage_names(lengths)
    head = f"{'tokens':>7s} {'used':>4s} " + " ".join(f"{s[:12]:>12s}" for s in names)
    for what, key, fmt in (("seconds", "seconds", "{:12.1f}"), ("peak RSS GB (working GB)", None, None)):
        print(f"\n{what} per stage")
        print(head + ("  max_rss_gb" if key is None else "   total_s"))
        for row in lengths:
            cells = []
            for s in names:
                st = row["stages"].get(s)
                if st is None:
                    cells.append(f"{'-':>12s}")
                elif key:
                    cells.append(fmt.format(st[key]))
                else:
                    cells.append(f"{st['peak_gb']:5.2f} ({st['working_gb']:4.2f})".rjust(12))
            tail = f"  {row['max_rss_gb']:10.2f}" if key is None else f" {row['seconds']:9.1f}"
            print(f"{row['prompt_tokens']['mean']:7.0f} {row['n_used']:4d} " + " ".join(cells) + tail)
    print("\ngrowth exponent vs prompt tokens (time / working memory)")
    for s in names:
        e = result["exponents"].get(s, {})
        fmt = lambda v: "  -  " if v is None else f"{v:5.2f}"  # noqa: E731
        print(f"  {s:20s} {fmt(e.get('seconds'))} / {fmt(e.get('working_gb'))}")
    rows = result["rows"]
    print(f"\ndecide at {rows['prompt_tokens']} tokens ({rows['row_bytes'] / 1e6:.0f} MB of K/V a row)")
    print(f"{'arm':>9s} {'rows':>5s} {'per step':>8s} {'seconds':>8s} {'working GB':>10s}")
    for r in rows["rows"]:
        print(f"{r['arm']:>9s} {r['rows']:5d} {r['rows_per_step']:8d} {r['seconds']:8.2f} {r['working_gb']:10.2f}")
    for arm, e in rows["exponents"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"  {arm}: time ~ rows^{fmt(e['seconds'])}, working memory ~ rows^{fmt(e['working_gb'])}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny random llama and a toy scenario instead of SmolLM2")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help=f"prompt tokens (default {LENGTHS})")
    p.add_argument("--rows", type=int, nargs="+", default=None, help=f"rows through decide (default {ROWS})")
    p.add_argument("--rows-length", type=int, default=None, help="prompt tokens of the rows sweep (default 2048)")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--act-pairs", type=int, default=2)
    p.add_argument("--heatmap-pairs", type=int, default=1)
    p.add_argument("--in-process", action="store_true", help="run every length in this process (peaks not independent)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--resume", action="store_true",
                   help="reuse the lengths (and rows sweep) the results file already holds for the same settings")
    p.add_argument("--worker", choices=("length", "rows"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    opts = {"toy": args.toy, "pairs": args.pairs, "act_pairs": args.act_pairs, "heatmap_pairs": args.heatmap_pairs}
    lengths = args.lengths or (TOY_LENGTHS if args.toy else LENGTHS)
    rows = args.rows or (TOY_ROWS if args.toy else ROWS)
    rows_length = args.rows_length or (TOY_LENGTHS[0] if args.toy else 2048)
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        res = (run_length(lengths[0], **opts) if args.worker == "length"
               else run_rows(rows_length, rows, toy=args.toy))
        Path(args.worker_out).write_text(json.dumps(res))
        return res
    flags = ["--toy"] if args.toy else []
    flags += ["--pairs", str(args.pairs), "--act-pairs", str(args.act_pairs),
              "--heatmap-pairs", str(args.heatmap_pairs)]
    name = f"scaling-{'toy-cpu' if args.toy else 'cpu'}"
    done: dict = {"lengths": {}, "rows": None}
    path = Path(args.out) / f"{name}.json"
    if args.resume and path.exists():  # keep what an interrupted run of the same settings measured
        old = json.loads(path.read_text())
        if all(old.get(k) == getattr(args, k) for k in ("pairs", "act_pairs", "heatmap_pairs")):
            done["lengths"] = {r["context_tokens"]: r for r in old["lengths"]}
            rows_old = old.get("rows")
            if rows_old and rows_old["context_tokens"] == rows_length and [r["rows"] for r in rows_old["rows"]
                                                                            if r["arm"] == "budget"] == list(rows):
                done["rows"] = rows_old
    per_length = []
    for n in lengths:
        if n in done["lengths"]:
            per_length.append(done["lengths"][n])
        elif args.in_process:
            per_length.append(run_length(n, **opts))
        else:
            per_length.append(_in_subprocess(["--worker", "length", "--lengths", str(n), *flags]))
        row = per_length[-1]
        print(f"{n} tokens: {row['seconds']:.0f} s, max RSS {row['max_rss_gb']:.2f} GB", flush=True)
        write_result(args.out, name, _result(args, per_length, done["rows"]))  # written as it goes
    rows_res = done["rows"]
    if rows_res is None and args.in_process:
        rows_res = run_rows(rows_length, rows, toy=args.toy)
    elif rows_res is None:
        rows_res = _in_subprocess(["--worker", "rows", "--rows-length", str(rows_length), "--rows",
                                   *map(str, rows), *(["--toy"] if args.toy else [])])
    result = _result(args, per_length, rows_res)
    _table(result)
    write_result(args.out, name, result)
    return result


def _result(args, per_length: list[dict], rows_res: dict | None) -> dict:
    """The results file: every length measured so far, the rows sweep, the fitted exponents."""
    import notekv as nk

    xs = [r["prompt_tokens"]["mean"] for r in per_length]
    exponents = {}
    for s in stage_names(per_length):
        pts = [(x, r["stages"][s]) for x, r in zip(xs, per_length) if s in r["stages"]]
        exponents[s] = {k: fit_exponent([x for x, _ in pts], [v[k] for _, v in pts]) for k in ("seconds", "working_gb")}
    if rows_res is not None:
        rows_res["exponents"] = {}
        for arm in dict.fromkeys(r["arm"] for r in rows_res["rows"]):
            pts = [r for r in rows_res["rows"] if r["arm"] == arm]
            rows_res["exponents"][arm] = {k: fit_exponent([r["rows"] for r in pts], [r[k] for r in pts])
                                          for k in ("seconds", "working_gb")}
    return {"device": "cpu", "threads": torch.get_num_threads(), "model": "toy-llama" if args.toy else "smollm2-135m",
            "scenario": "toy_gate" if args.toy else "refund", "screen": "swing", "pairs": args.pairs,
            "act_pairs": args.act_pairs, "heatmap_pairs": args.heatmap_pairs,
            "kv_budget_bytes": nk.kv.cache.KV_BUDGET, "isolated": not args.in_process,
            "memory": "RSS from /proc/self/statm sampled every 5 ms; working = peak - RSS before the build",
            "complete": rows_res is not None, "lengths": per_length, "exponents": exponents, "rows": rows_res}


if __name__ == "__main__":
    main()
