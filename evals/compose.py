"""Fidelity of composed skills against the model's own noise floor: ``compose.json`` + ``index.html``.

For every prefix x skill pair the reference is the full recompute of the same token ids
(prefix ids + skill text ids + suffix ids, one forward in the model's dtype). Each arm is compared with it
over the suffix positions (the last one is the decision):

* ``kl_last``: KL(full || arm) at the decision; ``kl_mean``: mean KL over suffix positions;
* ``top1``: fraction of suffix positions whose argmax agrees; ``top5``: mean overlap of the
  top-5 sets / 5; ``cos_last`` / ``cos_mean``: cosine of full-vocabulary logits;
* ``margin_err``: |margin(arm) - margin(full)| where the margin is logit(" Yes") - logit(" No")
  at the decision (two answer tokens, first differing token id); ``decision_agree``: same sign;
* ``logratio_err``: |log p(Yes)/p(No)| error (the answer-token probability ratio, in nats;
  equal to ``margin_err`` for logits, reported separately from softmax probabilities).

Arms: the compile modes ``isolated`` / ``sink`` / ``prefix`` (rotated, seam 0); the noise floor
``floor_incremental`` (prefix+skill prefilled, then the suffix from that cache) and the dtype floor
``floor_bf16`` (full recompute with the model loaded in bf16; ``floor_fp32``, the model in fp32,
when the evaluated model itself runs in bf16 or fp16); the controls ``unrotated`` (the
default mode's skill keys kept at the positions they were compiled at: a KVCache whose
``origin_positions`` are set to the target slots so the splice rotates by 0) and ``no_skill``
(prefix + suffix only, compared position by position over the suffix with the full recompute
*with* the skill). The seam-repair curve runs the default mode for K = 0..4.

What is composed is a :class:`Suite`: the built-in one (:data:`DEFAULT_SUITE`: the prefixes,
skills and questions below, answers " Yes" / " No"), or one built from a scenario file by
:func:`scenario_suite` (``notekv eval-compose --scenario``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from notekv.compose import DEFAULT_MODE, MODES, Skill, compose, text_ids
from notekv.errors import InputError
from notekv.stats import rate, summary
from notekv.sweep import answer_ids as sweep_answer_ids

PREFIXES = [
    "Customer record. Name: Ana Ruiz. Plan: premium. Order #4411 placed 12 days ago, delivered, unopened.\n",
    "Customer record. Name: Bo Chen. Plan: basic. Order #2093 placed 45 days ago, delivered, opened and used.\n",
    "Customer record. Name: Cy Okafor. Plan: premium. Order #7720 placed 3 days ago, still in transit.\n",
    "Customer record. Name: Di Novak. Plan: basic. Order #5154 placed 20 days ago, delivered damaged.\n",
    "Customer record. Name: Ed Sato. Plan: trial. Order #9902 placed 60 days ago, delivered, unopened.\n",
]

SKILLS = {
    "refunds": "Refund policy: refunds are allowed within 30 days of purchase if the item is unopened. "
               "Damaged items are always refundable. Opened items are never refunded.\n",
    "shipping": "Shipping policy: premium customers get free express shipping. Basic customers pay for "
                "shipping. Orders in transit cannot be changed or cancelled.\n",
    "access": "Access policy: only premium customers may open priority tickets. Trial accounts expire "
              "after 30 days and lose all support access.\n",
    "escalation": "Escalation policy: escalate to a manager when an order is damaged or older than 40 days. "
                  "Otherwise the agent resolves it directly.\n",
}

QUESTIONS = {
    "refunds": "Question: Should this customer get a refund? Answer:",
    "shipping": "Question: Is shipping free for this customer? Answer:",
    "access": "Question: May this customer open a priority ticket? Answer:",
    "escalation": "Question: Should this case be escalated to a manager? Answer:",
}

AGENT_TURNS = [
    ("User: I want to return order #4411, it is unopened.\n", None),
    ("User: The box was opened but the item is unused.\n", None),
    ("User: Actually it arrived damaged.\n", "Erratum: the order was placed 35 days ago, not 12.\n"),
    ("User: Can I get store credit instead?\n", None),
    ("User: My friend bought the same thing yesterday.\n", None),
    ("User: The item is still sealed in its box.\n", "Erratum: the item is opened.\n"),
    ("User: I am a premium customer.\n", None),
    ("User: It stopped working after one day.\n", None),
    ("User: Please check again.\n", "Erratum: the order is damaged.\n"),
    ("User: I never opened it.\n", None),
    ("User: Thank you for checking.\n", None),
    ("User: One more time, can I return it?\n", "Erratum: the order was placed 5 days ago.\n"),
]
AGENT_QUESTION = "Question: Should the refund be approved? Answer:"

METRICS = ("kl_last", "kl_mean", "top1", "top5", "cos_last", "cos_mean", "margin_err", "logratio_err",
           "decision_agree")


def answer_ids(model, answers: tuple[str, str] = (" Yes", " No")) -> tuple[int, int]:
    """Token ids of the two answer words (default " Yes" and " No") by notekv's one rule
    (:func:`notekv.sweep.answer_ids`)."""
    return sweep_answer_ids(model, answers)


def compare(ref: torch.Tensor, arm: torch.Tensor, yes: int, no: int) -> dict:
    """Metrics of ``arm`` logits ``[S, V]`` against ``ref`` ``[S, V]`` (suffix positions; last = decision)."""
    if ref.dim() != 2 or ref.shape != arm.shape:
        raise InputError(f"compare: logits of shapes {tuple(ref.shape)} and {tuple(arm.shape)}; pass two [positions, "
                         "vocab] tensors of one shape")
    ref, arm = ref.double(), arm.to(ref.device).double()  # a floor model may sit on another device
    lp, lq = ref.log_softmax(-1), arm.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    t5r, t5a = ref.topk(5, -1).indices, arm.topk(5, -1).indices
    overlap = torch.tensor([len(set(r.tolist()) & set(a.tolist())) / 5 for r, a in zip(t5r, t5a)])
    cos = torch.nn.functional.cosine_similarity(ref, arm, dim=-1)
    m_ref = float(ref[-1, yes] - ref[-1, no])
    m_arm = float(arm[-1, yes] - arm[-1, no])
    lr_ref = float(lp[-1, yes] - lp[-1, no])
    lr_arm = float(lq[-1, yes] - lq[-1, no])
    return {"kl_last": float(kl[-1]), "kl_mean": float(kl.mean()),
            "top1": float((ref.argmax(-1) == arm.argmax(-1)).double().mean()), "top5": float(overlap.mean()),
            "cos_last": float(cos[-1]), "cos_mean": float(cos.mean()), "margin_err": abs(m_arm - m_ref),
            "logratio_err": abs(lr_arm - lr_ref), "decision_agree": float((m_arm > 0) == (m_ref > 0)),
            "margin_full": m_ref, "margin_arm": m_arm}


def _prefix_ids(model, text: str) -> list[int]:
    return list(model.tokenize(text, special=True).ids)


def _unrotated(skill: Skill, start: int) -> Skill:
    """The skill's keys left where they were computed, declared to sit at ``start..``: the
    splice then rotates by zero (the no-re-rotation control)."""
    c = skill.cache
    n = len(c)
    pos = torch.arange(start, start + n)
    return replace(skill, cache=replace(c, positions=pos, origin_keys=c.keys, origin_positions=pos))


def floor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the noise-floor recompute for a model in ``dtype``: bf16 for fp32, else fp32."""
    return torch.bfloat16 if dtype == torch.float32 else torch.float32


def floor_arm(floor_model) -> str:
    """The dtype floor's arm name: ``floor_bf16``, ``floor_fp16`` or ``floor_fp32``."""
    return "floor_" + {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(floor_model.dtype, "fp32")


def _last_logits(run, n: int) -> torch.Tensor:
    return run.logits[0, -n:].float()


def fidelity(model, floor_model=None, *, pairs=None, modes=MODES, default=DEFAULT_MODE, seams=range(5),
             controls: bool = True, suite: "Suite | None" = None) -> dict:
    """Per-pair metrics of every arm; ``pairs``: list of (prefix index, skill name) of ``suite``
    (default: the built-in prefixes, skills and questions). ``floor_model``: the same weights in
    another dtype, whose full recompute is the dtype floor arm (named by its dtype)."""
    suite = DEFAULT_SUITE if suite is None else suite
    yes, no = answer_ids(model, suite.answers)
    pairs = pairs if pairs is not None else [(i, s) for i in range(len(suite.prefixes)) for s in suite.skills]
    for p in pairs:
        if (not isinstance(p, (list, tuple)) or len(p) != 2 or isinstance(p[0], bool) or not isinstance(p[0], int)
                or not 0 <= p[0] < len(suite.prefixes) or p[1] not in suite.skills):
            raise InputError(f"pairs: {p!r} is not (prefix index, skill name) of the suite: prefixes 0.."
                             f"{len(suite.prefixes) - 1}, skills {sorted(suite.skills)}")
    compiled = {(m, s): Skill.compile(model, suite.skills[s], mode=m, name=s) for m in modes
                for s in {p[1] for p in pairs}}
    rows = {}

    def add(arm, metrics):
        rows.setdefault(arm, []).append(metrics)

    for pi, sname in pairs:
        pre = _prefix_ids(model, suite.prefixes[pi])
        sk = text_ids(model, suite.skills[sname])
        suf = list(model.tokenize(suite.suffix(pi, sname), special=False).ids)
        full_ids = torch.tensor([pre + sk + suf])
        ref = _last_logits(model.run(full_ids, logits="all"), len(suf))
        for m in modes:
            c = compose(model, pre, [compiled[(m, sname)]], suf)
            add(m, compare(ref, c.logits[0].float(), yes, no))
        for k in seams:
            c = compose(model, pre, [compiled[(default, sname)]], suf, seam=k)
            add(f"seam{k}", compare(ref, c.logits[0].float(), yes, no))
        head = model.run(torch.tensor([pre + sk]), logits="last")
        inc = model.run(torch.tensor([suf]), past=head, logits="all")
        add("floor_incremental", compare(ref, inc.logits[0].float(), yes, no))
        if floor_model is not None:
            add(floor_arm(floor_model), compare(ref, _last_logits(floor_model.run(full_ids, logits="all"), len(suf)),
                                                yes, no))
        if controls:
            c = compose(model, pre, [_unrotated(compiled[(default, sname)], len(pre))], suf)
            add("unrotated", compare(ref, c.logits[0].float(), yes, no))
            ns = model.run(torch.tensor([pre + suf]), logits="all")
            add("no_skill", compare(ref, _last_logits(ns, len(suf)), yes, no))
    out = {}
    for arm, rs in rows.items():
        out[arm] = {k: summary([r[k] for r in rs]) for k in METRICS}
        out[arm]["decision_agree_rate"] = rate(int(sum(r["decision_agree"] for r in rs)), len(rs))
        out[arm]["per_pair"] = rs
    return {"n_pairs": len(pairs), "pairs": [[p, s] for p, s in pairs], "answer_tokens": [yes, no],
            "arms": out}


def agent(model, skill: Skill, *, turns=AGENT_TURNS, prefix: str = PREFIXES[0], question: str = AGENT_QUESTION,
          answers: tuple[str, str] = (" Yes", " No")) -> dict:
    """Multi-turn loop: the policy skill spliced once after ``prefix``; each turn appends the
    user's turn (+ an erratum on some turns) and the question, decides between the two
    ``answers`` (default Yes/No), then appends the full recompute's answer to both histories
    (so both arms keep identical tokens).

    Composed arm: incremental (each turn prefilled onto the running cache). Full arm: the
    whole history recomputed from scratch every turn. Times are cumulative wall seconds.
    """
    yes, no = answer_ids(model, answers)
    pre = _prefix_ids(model, prefix)
    t0 = time.perf_counter()
    comp = compose(model, pre, [skill])
    past = comp.cache
    t_comp = time.perf_counter() - t0
    history = pre + text_ids(model, skill.text)
    t_full = 0.0
    per_turn = []
    for i, (user, erratum) in enumerate(turns):
        turn = user + (erratum or "") + question
        ids = list(model.tokenize(turn, special=False).ids)
        t0 = time.perf_counter()
        run = model.run(torch.tensor([ids]), past=past, logits="last")
        t_comp += time.perf_counter() - t0
        t0 = time.perf_counter()
        full = model.run(torch.tensor([history + ids]), logits="last")
        t_full += time.perf_counter() - t0
        m_c = float(run.logits[0, -1, yes] - run.logits[0, -1, no])
        m_f = float(full.logits[0, -1, yes] - full.logits[0, -1, no])
        answer = list(model.tokenize((answers[0] if m_f > 0 else answers[1]) + "\n", special=False).ids)
        history = history + ids + answer
        t0 = time.perf_counter()
        nxt = model.run(torch.tensor([answer]), past=run, logits="last")
        past = nxt.kv
        t_comp += time.perf_counter() - t0
        per_turn.append({"turn": i + 1, "erratum": erratum is not None, "margin_composed": m_c, "margin_full": m_f,
                         "agree": (m_c > 0) == (m_f > 0), "t_composed_cum_s": t_comp, "t_full_cum_s": t_full,
                         "context_tokens": len(history)})
    k = sum(t["agree"] for t in per_turn)
    return {"skill_mode": skill.mode, "n_turns": len(per_turn), "agreement": rate(k, len(per_turn)),
            "margin_err": summary([abs(t["margin_composed"] - t["margin_full"]) for t in per_turn]),
            "time_composed_s": t_comp, "time_full_s": t_full,
            "time_ratio_full_over_composed": t_full / t_comp if t_comp else float("nan"), "per_turn": per_turn}


KEYSTONE_TEMPLATE = ("Refund policy: refunds are allowed within {window} days of purchase if the item is unopened. "
                     "Opened items are never refunded.\n")
KEYSTONE_EDITS = [("30", "10"), ("10", "30"), ("30", "90")]
KEYSTONE_CUE = "Question: Should this customer get a refund? Answer:"
KEYSTONE_MODES = ("in_place", "erratum", "field+erratum")


def keystone(model, *, mode: str = DEFAULT_MODE, prefixes=PREFIXES, edits=KEYSTONE_EDITS, field: str = "window",
             answers: tuple[str, str] = (" Yes", " No"), contexts=None) -> dict:
    """Edit a field inside a transplanted skill vs the same edit in a recomputed context.

    Per context x (old, new) value: an :class:`~notekv.EditableContext` over prefix + policy
    template. ``recomputed``: its own prefilled state edited by each mode. ``transplanted``: the
    same state with its cache replaced by the composition (policy compiled as a skill with the
    old value, spliced after the prefix). Both are scored against the full recompute of the new
    values: decision agreement, KL of the next token after the cue and |margin error| (log-prob
    margin of the two ``answers``, default " Yes" vs " No"). ``contexts``: (prefix template,
    policy template, cue) triples, format strings whose ``{field}`` placeholders are edited
    (default: each of ``prefixes`` before :data:`KEYSTONE_TEMPLATE`, cue :data:`KEYSTONE_CUE`).
    Cases whose composed token ids differ from the context's layout, whose field merges with its
    neighbours or whose new value has another token count are skipped and counted.
    """
    from dataclasses import replace as _replace

    from notekv import EditableContext, EditError

    if contexts is None:
        contexts = [(prefix, KEYSTONE_TEMPLATE, KEYSTONE_CUE) for prefix in prefixes]
    same = [e for e in edits if len(e) != 2 or e[0] == e[1]]
    if same:
        raise InputError(f"edits: {same[0]!r} is not an (old, new) pair of two different values; an edit to the same "
                         "value changes nothing")
    choices = [a.strip() for a in answers]
    rows, skipped, reasons = [], 0, []
    for prefix_t, template, cue in contexts:
        for old, new in edits:
            prefix = prefix_t.format(**{field: old})
            try:
                ctx = EditableContext(model, prefix_t + template, {field: old}, cue=cue, choices=choices)
                if len(ctx.render({field: new})) != len(ctx.layout):
                    raise EditError(f"{new!r} gives the context {len(ctx.render({field: new}))} tokens, {old!r} "
                                    f"{len(ctx.layout)}")
            except EditError as err:
                skipped += 1
                reasons.append(f"{old!r} -> {new!r}: {err}")
                continue
            ctx.prefill()
            skill = Skill.compile(model, template.format(**{field: old}), mode=mode, name="policy")
            comp = compose(model, _prefix_ids(model, prefix), [skill])
            if comp.cache.token_ids.tolist() != list(ctx.layout.ids):
                skipped += 1
                reasons.append(f"{old!r} -> {new!r}: the composed token ids differ from the context's")
                continue
            base = ctx.state
            trans = _replace(base, cache=_replace(comp.cache, segments=base.cache.segments), _memo={})
            ref = ctx.reference({field: new}).decide(both=False)
            for arm, st in (("recomputed", base), ("transplanted", trans)):
                for m in ("stale",) + KEYSTONE_MODES:
                    d = st.edit(field, new, mode=m).decide(both=False)
                    rows.append({"arm": arm, "mode": m, "prefix": prefix, "old": old, "new": new,
                                 "agree": d.choice == ref.choice, "kl": float(d.kl_from(ref)),
                                 "margin_err": abs(d.margin - ref.margin), "margin": d.margin,
                                 "full_margin": ref.margin})
    out = {}
    for arm in ("recomputed", "transplanted"):
        for m in ("stale",) + KEYSTONE_MODES:
            rs = [r for r in rows if r["arm"] == arm and r["mode"] == m]
            out[f"{arm}/{m}"] = {"agreement": rate(sum(r["agree"] for r in rs), len(rs)),
                                 "kl": summary([r["kl"] for r in rs]), "margin_err": summary([r["margin_err"] for r in rs])}
    result = {"skill_mode": mode, "n_cases": len(rows) // (2 * (1 + len(KEYSTONE_MODES))), "skipped": skipped,
              "arms": out, "rows": rows}
    if reasons:
        result["skip_reasons"] = reasons
    return result


@dataclass(frozen=True)
class Suite:
    """What ``eval-compose`` composes: the prefixes, the skills, each pair's suffix, the two
    answer words, the agent loop and the keystone contexts. :data:`DEFAULT_SUITE` is the built-in
    one; :func:`scenario_suite` builds one from a scenario file."""

    name: str
    prefixes: tuple
    skills: dict  # skill name -> text
    questions: dict  # skill name -> question; the suffix is "\n" + question unless ``suffixes`` is set
    answers: tuple
    agent_skill: str
    agent_prefix: str
    agent_turns: tuple  # (user text, erratum or None) per turn
    agent_question: str
    keystone_contexts: tuple  # (prefix template, policy template, cue); see :func:`keystone`
    keystone_field: str
    keystone_edits: tuple  # (old, new) values
    suffixes: tuple = ()  # per prefix: the whole suffix text (scenario suites)
    scenario: dict | None = None  # where a scenario suite came from (written to compose.json)

    def suffix(self, prefix_index: int, skill: str) -> str:
        return self.suffixes[prefix_index] if self.suffixes else "\n" + self.questions[skill]


DEFAULT_SUITE = Suite(
    name="built-in", prefixes=tuple(PREFIXES), skills=dict(SKILLS), questions=dict(QUESTIONS), answers=(" Yes", " No"),
    agent_skill="refunds", agent_prefix=PREFIXES[0], agent_turns=tuple(AGENT_TURNS), agent_question=AGENT_QUESTION,
    keystone_contexts=tuple((p, KEYSTONE_TEMPLATE, KEYSTONE_CUE) for p in PREFIXES), keystone_field="window",
    keystone_edits=tuple(KEYSTONE_EDITS))

RECORD = "Record #{id}. Name: {name}. {field}: {value}.\n"  # a scenario suite's prefix
_SLOT = "\x00value\x00"  # stands for the field value while a template is escaped


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def scenario_suite(name_or_path, *, n_prefixes: int = 20, n_keystone: int = 5, n_turns: int = 12) -> Suite:
    """A suite from a scenario (a built-in name or a TOML file, see :mod:`circuits.scenarios`).

    Skill: the scenario's policy (its trigger set to the first positive value for a polarity
    scenario). Prefix ``k``: a record (:data:`RECORD`) holding the field with value ``k`` of the
    positive and negative values in turn; its suffix: the few-shot examples and the query of
    variant ``k`` with the same value, decided between the two ``answers``. Agent: turn 1 is the
    examples and a query, later turns one query each over the values in turn, each followed by
    the full recompute's answer. Keystone: the record, the policy, the examples and the query up
    to its field value compiled as the skill, the field (in the record and the query) edited by
    the scenario's ``value_pairs`` (else three drawn pairs), the rest of the query as the cue.
    Raises :class:`~circuits.scenarios.ScenarioError` naming the file and the key.
    """
    import random

    from circuits import scenarios
    from notekv.errors import check_int

    for name, value in (("n_prefixes", n_prefixes), ("n_keystone", n_keystone), ("n_turns", n_turns)):
        check_int(name, value, low=1)
    sc = scenarios.get(name_or_path)
    where = str(name_or_path)
    if sc.kind == "readback":
        raise scenarios.ScenarioError(f"{where}: kind 'readback' has no answer words to decide between; eval-compose "
                                      "needs kind = 'gate' or 'polarity' and the key 'answers'")
    if not sc.field.isidentifier():
        raise scenarios.ScenarioError(f"{where}: key 'field' = {sc.field!r} must be a plain name (letters, digits, _) "
                                      "for eval-compose's keystone edits")
    if not sc.query.split("{value}")[-1].strip():
        raise scenarios.ScenarioError(f"{where}: key 'query' ends with {{value}}; eval-compose needs the decision "
                                      "cue after the field value")
    trigger = sc.positive_values[0] if sc.kind == "polarity" else None
    values = list(dict.fromkeys(sc.positive_values + sc.negative_values))
    answers = (sc.answers["positive"], sc.answers["negative"])
    policy = sc.parts(values[0], 0, trigger)[0].rstrip("\n") + "\n"

    def record(k: int, value: str) -> str:
        rng = random.Random(f"record/{k}")
        return RECORD.format(id=rng.randint(1000, 9999), name=rng.choice(sc.names), field=sc.field, value=value)

    prefixes, suffixes = [], []
    for k in range(n_prefixes):
        v = values[k % len(values)]
        _, examples, query = sc.parts(v, k, trigger)
        prefixes.append(record(k, v))
        suffixes.append(examples + query)
    turns = []
    for i in range(n_turns):
        v = values[i % len(values)]
        _, examples, query = sc.parts(v, i, trigger)
        turns.append(((examples if i == 0 else "") + query, None))
    contexts = []
    slot = "{" + sc.field + "}"
    for k in range(n_keystone):
        _, examples, query = sc.parts(_SLOT, k, trigger)
        *head, cue = query.split(_SLOT)
        contexts.append((_escape(record(k, _SLOT)).replace(_escape(_SLOT), slot),
                         _escape(policy + examples) + slot.join(_escape(h) for h in head), cue))
    edits = sc.value_pairs or tuple(sc.value_pair(v) for v in range(3))
    source = {"name": sc.name, "source": where, "kind": sc.kind, "field": sc.field,
              "positive_values": list(sc.positive_values), "negative_values": list(sc.negative_values),
              "answers": list(answers), "record": RECORD}
    return Suite(name=sc.name, prefixes=tuple(prefixes), skills={sc.name: policy}, questions={}, answers=answers,
                 agent_skill=sc.name, agent_prefix=prefixes[0], agent_turns=tuple(turns), agent_question="",
                 keystone_contexts=tuple(contexts), keystone_field=sc.field,
                 keystone_edits=tuple(tuple(e) for e in edits), suffixes=tuple(suffixes), scenario=source)


def evaluate(model_name: str, *, n_pairs: int | None = None, modes=MODES, default=DEFAULT_MODE,
             dtype_floor: bool = True, agent_turns: int | None = None, keystone_prefixes: int | None = None,
             model=None, floor_model=None, suite: Suite | None = None, dtype: torch.dtype = torch.float32,
             device=None) -> dict:
    """Everything ``eval-compose`` writes, on ``model_name`` loaded in ``dtype`` on ``device``.
    ``dtype_floor``: also recompute in the other dtype (bf16 for an fp32 model, else fp32) as a
    noise floor. ``model``/``floor_model`` override loading by name; ``suite``: what to compose
    (default :data:`DEFAULT_SUITE`; see :func:`scenario_suite`)."""
    import notekv as nk

    from notekv.errors import check_int

    suite = DEFAULT_SUITE if suite is None else suite
    for name, value in (("n_pairs", n_pairs), ("agent_turns", agent_turns), ("keystone_prefixes", keystone_prefixes)):
        if value is not None:
            check_int(name, value, low=1)
    t0 = time.perf_counter()
    model = model if model is not None else nk.load(model_name, dtype=dtype, device=device)
    answer_ids(model, suite.answers)  # refuse answer words the model cannot tell apart before any forward
    if dtype_floor and floor_model is None:
        floor_model = nk.load(model_name, dtype=floor_dtype(model.dtype), device=device or model.device)
    pairs = [(i, s) for i in range(len(suite.prefixes)) for s in suite.skills]
    if n_pairs is not None:
        pairs = pairs[:n_pairs]
    fid = fidelity(model, floor_model, pairs=pairs, modes=modes, default=default, suite=suite)
    arms = fid["arms"]
    best = min((m for m in modes), key=lambda m: arms[m]["kl_mean"]["mean"])
    turns = suite.agent_turns if agent_turns is None else suite.agent_turns[:agent_turns]
    skill = Skill.compile(model, suite.skills[suite.agent_skill], mode=default, name=suite.agent_skill)
    ag = agent(model, skill, turns=turns, prefix=suite.agent_prefix, question=suite.agent_question,
               answers=suite.answers)
    contexts = suite.keystone_contexts if keystone_prefixes is None else suite.keystone_contexts[:keystone_prefixes]
    ks = keystone(model, mode=default, edits=suite.keystone_edits, field=suite.keystone_field, answers=suite.answers,
                  contexts=contexts)
    result = {"model": model_name, "dtype": model.dtype_name, "default_mode": default, "best_mode_by_kl_mean": best,
              "seam_curve": {k: {"kl_mean": arms[f"seam{k}"]["kl_mean"], "kl_last": arms[f"seam{k}"]["kl_last"]}
                             for k in range(5)},
              "fidelity": fid, "agent": ag, "keystone": ks, "runtime_s": time.perf_counter() - t0}
    if suite.scenario is not None:
        result = {"model": model_name, "scenario": suite.scenario, **{k: v for k, v in result.items() if k != "model"}}
    return result


def _table(result: dict) -> str:
    rows = []
    for arm, r in result["fidelity"]["arms"].items():
        cells = "".join(f"<td>{r[k]['mean']:.4g} [{r[k]['ci'][0]:.3g}, {r[k]['ci'][1]:.3g}]</td>" for k in METRICS)
        rows.append(f"<tr><th>{arm}</th><td>{r['kl_mean']['n']}</td>{cells}</tr>")
    head = "".join(f"<th>{k}</th>" for k in METRICS)
    return f"<table><tr><th>arm</th><th>n</th>{head}</tr>{''.join(rows)}</table>"


def _keystone_table(ks) -> str:
    if not ks:
        return ""
    rows = "".join(
        f"<tr><th>{arm}</th><td>{r['agreement']['k']}/{r['agreement']['n']} [{r['agreement']['ci'][0]:.2f}, "
        f"{r['agreement']['ci'][1]:.2f}]</td><td>{r['kl']['mean']:.4g} [{r['kl']['ci'][0]:.3g}, {r['kl']['ci'][1]:.3g}]</td>"
        f"<td>{r['margin_err']['mean']:.3g} [{r['margin_err']['ci'][0]:.3g}, {r['margin_err']['ci'][1]:.3g}]</td></tr>"
        for arm, r in ks["arms"].items())
    return (f"<h2>Keystone: editing a field inside a transplanted skill ({ks['n_cases']} cases, {ks['skipped']} skipped)"
            "</h2><p>Each arm against the full recompute of the new value.</p><table><tr><th>arm/mode</th>"
            f"<th>decision agreement</th><th>KL</th><th>margin error</th></tr>{rows}</table>")


def write_html(result: dict, path: Path) -> None:
    from html import escape

    from plotly.subplots import make_subplots

    arms = result["fidelity"]["arms"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("mean KL over suffix (95% CI)", "seam repair K",
                                                        "agent cumulative time (s)"))
    names = list(arms)
    means = [arms[a]["kl_mean"]["mean"] for a in names]
    fig.add_bar(x=names, y=means, row=1, col=1, name="KL",
                error_y=dict(type="data", symmetric=False,
                             array=[arms[a]["kl_mean"]["ci"][1] - m for a, m in zip(names, means)],
                             arrayminus=[m - arms[a]["kl_mean"]["ci"][0] for a, m in zip(names, means)]))
    ks = sorted(result["seam_curve"], key=int)
    fig.add_scatter(x=[int(k) for k in ks], y=[result["seam_curve"][k]["kl_mean"]["mean"] for k in ks], row=1, col=2,
                    name="seam KL")
    pt = result["agent"]["per_turn"]
    fig.add_scatter(x=[t["turn"] for t in pt], y=[t["t_composed_cum_s"] for t in pt], row=1, col=3, name="composed")
    fig.add_scatter(x=[t["turn"] for t in pt], y=[t["t_full_cum_s"] for t in pt], row=1, col=3, name="full recompute")
    fig.update_yaxes(type="log", row=1, col=1)
    ag = result["agent"]
    sc = result.get("scenario")
    scenario = escape(f", scenario {sc['name']} ({sc['source']})") if sc else ""
    html = (f"<html><head><meta charset='utf-8'><title>notekv eval-compose {result['model']}</title>"
            "<style>td,th{border:1px solid #ccc;padding:3px;font:12px sans-serif}</style></head><body>"
            f"<h1>Composition fidelity: {result['model']}{scenario}</h1><p>{result['fidelity']['n_pairs']} prefix x skill pairs; "
            f"default mode {result['default_mode']}; best by mean KL {result['best_mode_by_kl_mean']}; runtime "
            f"{result['runtime_s']:.0f} s. Mean [95% bootstrap CI] per arm.</p>{_table(result)}"
            f"<p>Agent: {ag['n_turns']} turns, decision agreement {ag['agreement']['rate']:.2f} "
            f"[{ag['agreement']['ci'][0]:.2f}, {ag['agreement']['ci'][1]:.2f}], time full/composed "
            f"{ag['time_ratio_full_over_composed']:.2f}x</p>"
            + _keystone_table(result.get("keystone")) + fig.to_html(full_html=False, include_plotlyjs=True) + "</body></html>")
    path.write_text(html)


def save(result: dict, out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compose.json").write_text(json.dumps(result, indent=1))
        write_html(result, out / "index.html")
    except OSError as err:
        raise InputError(f"out_dir={str(out)!r}: cannot write the results there ({err.strerror or err}); pass a "
                         "directory you can write") from None
    return out
