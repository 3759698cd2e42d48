"""Gated-decision scenarios as data, and the aligned OLD/NEW pairs they generate.

A scenario is a TOML file: a policy line, a mutable field and its values (the rule holds
for ``positive_values``), few-shot examples, a query and two answer words. Built-in ones
live in ``circuits/scenarios/data``; a user passes the path of their own file in the same
format. Kinds: ``gate`` (the answer depends on the field through the rule), ``readback``
(the answer is the field value) and ``polarity`` (the field is fixed, the rule's trigger
word flips). Every pair has OLD and NEW prompts of equal token length that differ only
inside one span; anything else is refused with an error naming the key or value.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from notekv.errors import InputError, NotekvError, check_int
from notekv.hooks.positions import Span, SpanError, TokenView

DATA = Path(__file__).parent / "data"
KINDS = ("gate", "readback", "polarity")
REQUIRED = ("name", "kind", "field", "positive_values", "negative_values", "policy", "query")
OPTIONAL = ("description", "answers", "shots", "example", "query_request", "requests", "names", "edit",
            "order", "example_negatives", "value_pairs", "example_region")
REGIONS = ("sink", "policy", "examples", "field", "downstream", "decision")  # the label of each slot of a pair
EDIT_REQUIRED = ("line", "cue", "requests")
EDIT_OPTIONAL = ("shots", "negative_values")


class ScenarioError(NotekvError, ValueError):
    """A scenario file or value that cannot produce aligned pairs."""


@dataclass(frozen=True)
class Pair:
    """One aligned OLD/NEW pair. ``s = logit[good] - logit[bad]`` at the last slot; the rule
    says its sign should be ``expect_old`` for OLD and ``expect_new`` for NEW."""

    scenario: str
    kind: str
    variant: int
    old: str
    new: str
    old_value: str
    new_value: str
    old_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    span_slots: tuple[int, ...]  # the edited span (the field, or the rule's trigger)
    diff_slots: tuple[int, ...]  # where the token ids differ
    regions: tuple[str, ...]  # per slot: sink, policy, examples (or the scenario's example_region), field,
    #                           downstream, decision
    good: int
    bad: int
    expect_old: int
    expect_new: int

    @property
    def n(self) -> int:
        return len(self.old_ids)

    @property
    def downstream(self) -> list[int]:
        """Slots after the edited span, before the decision slot."""
        return list(range(max(self.span_slots) + 1, self.n - 1))


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    field: str
    positive_values: tuple[str, ...]
    negative_values: tuple[str, ...]
    policy: str
    query: str
    query_request: str = ""
    description: str = ""
    answers: dict = field(default_factory=dict)
    shots: int = 0
    example: str = ""
    requests: tuple[str, ...] = ()
    names: tuple[str, ...] = ("Ana",)
    edit: dict = field(default_factory=dict)  # the gate as an editable context (see edit_gate)
    order: str = ""  # the examples' labels in order, e.g. "PNPNPPNP" (default: alternate, then shuffle)
    example_negatives: str = "pair"  # "pair": examples use the pair's negative value; "cycle": all, in turn
    value_pairs: tuple = ()  # explicit (old, new) pairs, used in turn by the variants
    example_region: str = "examples"  # the region label of the few-shot examples' slots

    def edit_gate(self) -> dict | None:
        """The editing form of this gate for ``notekv eval-edits`` (None without an ``[edit]``
        table): policy, field, values and answer words come from the scenario itself."""
        if not self.edit:
            return None
        e = self.edit
        return {"policy": self.policy, "field": self.field, "positive": list(self.positive_values),
                "negative": list(e.get("negative_values", self.negative_values)), "line": e["line"],
                "cue": e["cue"], "answers": (self.answers["positive"].strip(), self.answers["negative"].strip()),
                "shots": int(e.get("shots", self.shots)), "requests": list(e["requests"])}

    # ------------------------------------------------------------------ prompts
    def _fill(self, text: str, rng: random.Random) -> str:
        return (text.replace("{name}", rng.choice(self.names))
                .replace("{id}", str(rng.randint(1000, 9999)))
                .replace("{amount}", str(rng.randint(5, 500))))

    def _parts(self, variant: int, value: str, trigger: str | None):
        rng = random.Random(variant * 7919 + 17)
        policy = self.policy.replace("{trigger}", trigger if trigger is not None else self.positive_values[0])
        # The examples use the variant's own pair of values (both OLD and NEW see the same examples).
        pos_value, neg_value = sorted(self._values(variant), key=lambda v: v not in self.positive_values)
        shots = []
        for i in range(self.shots):
            positive = self.order[i] == "P" if self.order else i % 2 == 0
            if positive:
                v = pos_value
            elif self.example_negatives == "cycle":
                v = self.negative_values[(i // 2 + variant) % len(self.negative_values)]
            else:
                v = neg_value
            ans = self.answers.get("positive" if positive else "negative", "").strip()
            req = self._fill(rng.choice(self.requests) if self.requests else self.query_request, rng)
            shot = self.example.replace("{value}", v).replace("{request}", req).replace("{answer}", ans)
            shots.append(self._fill(shot, rng))
        if not self.order:  # a stated order is kept as written
            rng.shuffle(shots)
        qrng = random.Random(variant * 104729 + 3)
        query = self.query.replace("{request}", self._fill(self.query_request, qrng))
        query = self._fill(query, qrng)
        head = policy.rstrip("\n") + "\n" + "".join(shots)
        return policy, head, query.replace("{value}", value)

    def prompt(self, value: str, variant: int = 0, trigger: str | None = None) -> str:
        """The full prompt for ``value`` (and, for polarity, the rule's ``trigger``)."""
        _, head, query = self._parts(variant, value, trigger)
        return head + query

    def parts(self, value: str, variant: int = 0, trigger: str | None = None) -> tuple[str, str, str]:
        """``(policy, examples, query)`` of :meth:`prompt`: the policy line (its trigger filled
        in), the few-shot examples as one text, and the query holding ``value``."""
        policy, head, query = self._parts(variant, value, trigger)
        return policy, head[len(policy.rstrip("\n")) + 1:], query

    def value_pair(self, variant: int = 0) -> tuple[str, str]:
        """The (old, new) values of ``variant``: ``value_pairs`` in turn, else a positive and a
        negative value drawn for the variant, alternating direction."""
        return self._values(variant)

    # ------------------------------------------------------------------ pairs
    def _values(self, variant: int) -> tuple[str, str]:
        if self.value_pairs:
            old, new = self.value_pairs[variant % len(self.value_pairs)]
            return old, new
        rng = random.Random(variant * 31 + 5)
        pos, neg = rng.choice(self.positive_values), rng.choice(self.negative_values)
        return (pos, neg) if variant % 2 == 0 else (neg, pos)

    def pair(self, tokenizer_model, variant: int = 0, old: str | None = None, new: str | None = None) -> Pair:
        """The aligned pair of ``variant`` (values alternate direction across variants)."""
        model = tokenizer_model
        o, n = self._values(variant)
        old, new = old or o, new or n
        if self.kind == "polarity":
            value = self.positive_values[0]
            old_text = self.prompt(value, variant, trigger=old)
            new_text = self.prompt(value, variant, trigger=new)
            span_text, new_span, occurrence = old, new, 0
            policy_end = len(self.policy.replace("{trigger}", old))
        else:
            old_text, new_text = self.prompt(old, variant), self.prompt(new, variant)
            span_text, new_span, occurrence = f"{self.field}: {old}", f"{self.field}: {new}", -1
            policy_end = len(self.policy)
        ov, nv = model.tokenize(old_text), model.tokenize(new_text)
        if len(ov) != len(nv):
            raise ScenarioError(
                f"scenario {self.name!r}: values {old!r} and {new!r} of {self.field!r} tokenize to different "
                f"lengths ({len(ov)} vs {len(nv)} tokens); use values of equal token length"
            )
        try:
            span = Span(span_text, occurrence=occurrence).resolve(ov)
            Span(new_span, occurrence=occurrence).resolve(nv)
        except SpanError as err:
            raise ScenarioError(f"scenario {self.name!r}, value {old!r}/{new!r}: {err}") from None
        diff = [i for i, (a, b) in enumerate(zip(ov.ids, nv.ids)) if a != b]
        if not diff or not set(diff) <= set(span):
            raise ScenarioError(
                f"scenario {self.name!r}: OLD and NEW differ at slots {diff}, outside the edited span {span} "
                f"({[ov.tokens[i] for i in diff]}); the value merges with neighbouring text"
            )
        good, bad, e_old, e_new = self._answer_tokens(model, old, new)
        return Pair(self.name, self.kind, variant, old_text, new_text, old, new, ov.ids, nv.ids, ov.tokens,
                    tuple(span), tuple(diff), _regions(ov, span, policy_end, self.example_region), good, bad,
                    e_old, e_new)

    def _answer_tokens(self, model, old: str, new: str) -> tuple[int, int, int, int]:
        if self.kind == "readback":
            return model.token_id(" " + new), model.token_id(" " + old), -1, 1
        good, bad = model.token_id(self.answers["positive"]), model.token_id(self.answers["negative"])
        sign = {v: 1 for v in self.positive_values} | {v: -1 for v in self.negative_values}
        return good, bad, sign[old], sign[new]

    def pairs(self, model, n: int, seed: int = 0, context_tokens: int | None = None) -> list[Pair]:
        """``n`` pairs from variants ``seed, seed + 1, ...``. With ``context_tokens``, each
        pair gets as many few-shot examples as keep its prompt within that many tokens
        (:meth:`fit`): a long context whose field and downstream are the scenario's own."""
        if context_tokens is None:
            return [self.pair(model, seed + i) for i in range(n)]
        return [self.fit(model, context_tokens, seed + i).pair(model, seed + i) for i in range(n)]

    def with_shots(self, shots: int) -> "Scenario":
        """This scenario with ``shots`` examples; a stated ``order`` repeats (or is cut) to match."""
        order = (self.order * -(-shots // len(self.order)))[:shots] if self.order else ""
        return replace(self, shots=shots, order=order)

    def fit(self, model, context_tokens: int, variant: int = 0) -> "Scenario":
        """This scenario with the most examples that keep ``variant``'s prompt within
        ``context_tokens`` tokens (fewer than its own when ``context_tokens`` is short). The
        examples come before the field, so the query and the decision stay the scenario's own.
        Refuses more tokens than ``model``'s positions and a prompt that cannot fit."""
        n = check_int("context_tokens", context_tokens, low=1)
        limit = model.spec.max_positions
        if limit and n > limit:
            raise InputError(f"context_tokens={n} is above {model.name}'s context of {limit} positions; "
                             f"pass at most {limit}")

        def length(k: int) -> int:
            return self.with_shots(k).pair(model, variant).n

        bare = length(0)
        if bare > n:
            raise InputError(f"context_tokens={n}: scenario {self.name!r} needs {bare} tokens without any example; "
                             f"pass at least {bare}")
        if not self.example:
            raise InputError(f"context_tokens={n}: scenario {self.name!r} has no 'example' to repeat; "
                             "give it an example line (see the README's scenario format)")
        k = max(1, self.shots)
        for _ in range(2):  # estimate the count from the mean example length, twice (the second is close)
            k = max(1, k)
            per_shot = max(1.0, (length(k) - bare) / k)
            k = int((n - bare) / per_shot)
        while k > 0 and length(k) > n:
            k -= 1
        while length(k + 1) <= n:
            k += 1
        return self.with_shots(k)

    def check_values(self, model) -> None:
        """Every value must keep the prompt's token length and stay inside its span."""
        ref = self.positive_values[0]
        for v in self.positive_values + self.negative_values:
            if self.kind == "polarity":
                self.pair(model, 0, old=ref, new=v) if v != ref else None
            elif v != ref:
                self.pair(model, 0, old=ref, new=v)

    def usable(self, model) -> tuple["Scenario", list[dict]]:
        """This scenario with only the values that align on ``model``'s tokenizer, and the
        skipped ones (``{"value", "reason"}``), each also warned about.

        A value aligns when swapping it for the reference value (the first positive value)
        keeps the prompt's length and changes tokens only inside the field. Raises
        :class:`ScenarioError` when no negative value (or no other positive trigger) is left.
        """
        import warnings

        values = list(dict.fromkeys(self.positive_values + self.negative_values))
        if self.kind == "polarity":  # the field is fixed; the values are the rule's triggers
            lengths = {v: len(model.tokenize(self.prompt(self.positive_values[0], 0, trigger=v))) for v in values}
        else:
            lengths = {v: len(model.tokenize(self.prompt(v, 0))) for v in values}
        ref = self.positive_values[0]
        common = lengths[ref]
        skipped = []
        for v in values:
            if v == ref:
                continue
            if lengths[v] != common:
                reason = (f"{v!r} makes the prompt {lengths[v]} tokens, {ref!r} {common}: the pair would not align; "
                          "use a value of the same token count")
            else:
                try:
                    self.pair(model, 0, old=ref, new=v)
                    continue
                except ScenarioError as err:
                    reason = str(err)
            skipped.append({"value": v, "reason": reason})
            warnings.warn(f"scenario {self.name!r}: skipping value {reason}", stacklevel=2)
        gone = {d["value"] for d in skipped}
        pos = tuple(v for v in self.positive_values if v not in gone)
        neg = tuple(v for v in self.negative_values if v not in gone)
        if not pos or not neg:
            raise ScenarioError(f"scenario {self.name!r}: no {'positive' if not pos else 'negative'} value aligns on "
                                f"{model.name}; skipped: {[d['value'] for d in skipped]} ({skipped[0]['reason']})")
        return replace(self, positive_values=pos, negative_values=neg), skipped


def _regions(view: TokenView, span: list[int], policy_end: int, example_region: str = "examples") -> tuple[str, ...]:
    out = []
    first, last = min(span), max(span)
    for i, (a, _) in enumerate(view.offsets):
        if i == 0:
            out.append("sink")
        elif i == len(view) - 1:
            out.append("decision")
        elif first <= i <= last:
            out.append("field")
        elif i > last:
            out.append("downstream")
        elif a < policy_end:
            out.append("policy")
        else:
            out.append(example_region)
    return tuple(out)


def load(path: str | Path) -> Scenario:
    """Read a scenario TOML file; errors name the file and the bad key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file {path}; built-in scenarios: {', '.join(builtin())}") from None
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML ({err})") from None
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ScenarioError(f"{path}: missing key(s) {missing}; required: {list(REQUIRED)}")
    unknown = [k for k in raw if k not in REQUIRED + OPTIONAL]
    if unknown:
        raise ScenarioError(f"{path}: unknown key(s) {unknown}; allowed: {list(REQUIRED + OPTIONAL)}")
    for k in ("positive_values", "negative_values", "requests", "names"):
        if k in raw and (not isinstance(raw[k], list) or not raw[k]
                         or not all(isinstance(v, str) and v.strip() for v in raw[k])):
            raise ScenarioError(f"{path}: key {k!r} must be a non-empty list of non-empty strings, got {raw[k]!r}; "
                                f"write {k} = [\"a\", \"b\"]")
    for k in ("name", "kind", "field", "policy", "query", "description", "example", "query_request"):
        if k in raw and not isinstance(raw[k], str):
            raise ScenarioError(f"{path}: key {k!r} must be a string, got {type(raw[k]).__name__} {raw[k]!r}")
    for k in ("name", "field", "policy", "query"):
        if not raw[k].strip():
            raise ScenarioError(f"{path}: key {k!r} is empty")
    if "shots" in raw and (isinstance(raw["shots"], bool) or not isinstance(raw["shots"], int) or raw["shots"] < 0):
        raise ScenarioError(f"{path}: key 'shots' must be a whole number >= 0, got {raw['shots']!r}")
    if "order" in raw:
        o = raw["order"]
        if not isinstance(o, str) or set(o) - {"P", "N"} or len(o) != raw.get("shots", 0):
            raise ScenarioError(f"{path}: key 'order' must be a string of P and N, one letter per shot "
                                f"(shots = {raw.get('shots', 0)}), got {o!r}")
    if "example_region" in raw:
        r = raw["example_region"]
        others = [x for x in REGIONS if x != "examples"]
        if not isinstance(r, str) or not r.strip() or r.strip() in others:
            raise ScenarioError(f"{path}: key 'example_region' must be a non-empty string naming the few-shot "
                                f"examples' region, not one of the other regions {others}; got {r!r}")
        raw["example_region"] = r.strip()
    if raw.get("example_negatives", "pair") not in ("pair", "cycle"):
        raise ScenarioError(f"{path}: key 'example_negatives' is 'pair' or 'cycle', got {raw['example_negatives']!r}")
    if "value_pairs" in raw:
        vp = raw["value_pairs"]
        known = set(raw["positive_values"]) | set(raw["negative_values"])
        if (not isinstance(vp, list) or not vp or not all(isinstance(x, list) and len(x) == 2 for x in vp)
                or not all(v in known for x in vp for v in x)):
            raise ScenarioError(f"{path}: key 'value_pairs' must be a list of [old, new] pairs of the scenario's "
                                f"positive/negative values, got {vp!r}")
        raw["value_pairs"] = tuple(tuple(x) for x in vp)
    if raw["kind"] not in KINDS:
        raise ScenarioError(f"{path}: kind {raw['kind']!r}; choose one of {list(KINDS)}")
    if raw["kind"] != "readback" and not {"positive", "negative"} <= set(raw.get("answers", {})):
        raise ScenarioError(f"{path}: key 'answers' needs 'positive' and 'negative' answer words")
    if "{value}" not in raw["query"]:
        raise ScenarioError(f"{path}: key 'query' must contain the field placeholder {{value}}")
    if raw["kind"] == "polarity" and "{trigger}" not in raw["policy"]:
        raise ScenarioError(f"{path}: a polarity scenario's 'policy' must contain {{trigger}}")
    if raw.get("shots", 0) and "{value}" not in raw.get("example", ""):
        raise ScenarioError(f"{path}: key 'example' must contain {{value}} when shots > 0")
    if "edit" in raw:
        e = raw["edit"]
        bad = [k for k in EDIT_REQUIRED if k not in e] if isinstance(e, dict) else list(EDIT_REQUIRED)
        if bad or raw["kind"] != "gate":
            raise ScenarioError(f"{path}: an [edit] table needs kind = 'gate' and the keys {list(EDIT_REQUIRED)} "
                                f"(missing: {bad}); optional: {list(EDIT_OPTIONAL)}")
        extra = [k for k in e if k not in EDIT_REQUIRED + EDIT_OPTIONAL]
        if extra:
            raise ScenarioError(f"{path}: unknown key(s) {extra} in [edit]; allowed: {list(EDIT_REQUIRED + EDIT_OPTIONAL)}")
    for k in ("positive_values", "negative_values", "requests", "names"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return Scenario(**raw)


def builtin() -> list[str]:
    return sorted(p.stem for p in DATA.glob("*.toml"))


def get(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name, or a user's TOML file by path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return load(p)
    if str(name_or_path) not in builtin():
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r}; built-in: {builtin()} (or pass a .toml path)")
    return load(DATA / f"{name_or_path}.toml")
