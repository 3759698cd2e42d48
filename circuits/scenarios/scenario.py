"""The :class:`Scenario` type: the prompts a scenario writes (policy, few-shot examples,
query), the aligned pairs it makes, its fit to a context length and its values that align on a
tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from notekv.errors import InputError, check_int

from .errors import ScenarioError
from .pair import Pair, align, regions


@dataclass(frozen=True)
class Scenario:
    """A gated decision as data (one TOML file): a policy line, a mutable ``field`` whose
    ``positive_values`` satisfy the rule, few-shot examples, a query and two answer words;
    makes prompts and aligned OLD/NEW pairs (:class:`Pair`)."""

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
        self._check_text(value=value, trigger=trigger)
        check_int("variant", variant)
        _, head, query = self._parts(variant, value, trigger)
        return head + query

    def parts(self, value: str, variant: int = 0, trigger: str | None = None) -> tuple[str, str, str]:
        """``(policy, examples, query)`` of :meth:`prompt`: the policy line (its trigger filled
        in), the few-shot examples as one text, and the query holding ``value``."""
        self._check_text(value=value, trigger=trigger)
        check_int("variant", variant)
        policy, head, query = self._parts(variant, value, trigger)
        return policy, head[len(policy.rstrip("\n")) + 1:], query

    def value_pair(self, variant: int = 0) -> tuple[str, str]:
        """The (old, new) values of ``variant``: ``value_pairs`` in turn, else a positive and a
        negative value drawn for the variant, alternating direction."""
        return self._values(check_int("variant", variant))

    def _check_text(self, **values) -> None:
        for name, v in values.items():
            if v is not None and not isinstance(v, str):
                raise ScenarioError(f"scenario {self.name!r}: {name}={v!r} is a {type(v).__name__}; pass the text of "
                                    "one of its values")

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
        o, n = self._values(check_int("variant", variant))
        old, new = o if old is None else old, n if new is None else new
        self.check_pair(old, new)
        return self._make_pair(tokenizer_model, variant, old, new)

    def _make_pair(self, model, variant: int, old: str, new: str) -> Pair:
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
        ov, nv, span, diff = align(model, self.name, self.field, (old, new), (old_text, new_text),
                                   (span_text, new_span), occurrence)
        good, bad, e_old, e_new = self._answer_tokens(model, old, new)
        return Pair(self.name, self.kind, variant, old_text, new_text, old, new, ov.ids, nv.ids, ov.tokens,
                    tuple(span), tuple(diff), regions(ov, span, policy_end, self.example_region), good, bad,
                    e_old, e_new)

    def check_pair(self, old, new) -> None:
        """Refuse a pair that cannot mean anything: values that are not text, equal values,
        and (gate, polarity) values the scenario does not list or that the rule answers alike."""
        for what, v in (("old", old), ("new", new)):
            if not isinstance(v, str) or not v.strip():
                raise ScenarioError(f"scenario {self.name!r}: {what}={v!r}; pass one of the values "
                                    f"{list(self.positive_values + self.negative_values)}")
        if old == new:
            raise ScenarioError(f"scenario {self.name!r}: old and new are both {old!r}; a pair needs two different "
                                "values of the field (nothing would change between OLD and NEW)")
        if self.kind == "readback":
            return
        known = self.positive_values + self.negative_values
        unknown = [v for v in (old, new) if v not in known]
        if unknown:
            raise ScenarioError(f"scenario {self.name!r}: {unknown[0]!r} is not one of its values; the rule answers "
                                f"positive for {list(self.positive_values)} and negative for "
                                f"{list(self.negative_values)}")
        if (old in self.positive_values) == (new in self.positive_values):
            side = "positive" if old in self.positive_values else "negative"
            raise ScenarioError(f"scenario {self.name!r}: {old!r} and {new!r} are both {side} values, so the rule "
                                "answers both alike; a pair needs one positive and one negative value")

    def _word_id(self, model, word: str, key: str) -> int:
        ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ScenarioError(f"scenario {self.name!r}: {key} {word!r} is {len(ids)} tokens {ids} on {model.name}, "
                                "not one; the decision reads one token per answer: use words that are a single "
                                "token (often with a leading space, e.g. \" yes\")")
        return int(ids[0])

    def answer_ids(self, model) -> tuple[int, int]:
        """The token ids ``(good, bad)`` of the answers on ``model``'s tokenizer (gate and
        polarity); raises :class:`ScenarioError` naming the key for a word that is not one token
        or two answers that are one token."""
        if self.kind == "readback":
            raise ScenarioError(f"scenario {self.name!r}: kind 'readback' answers with the field's values, not "
                                "with answer words")
        good = self._word_id(model, self.answers["positive"], "answers.positive")
        bad = self._word_id(model, self.answers["negative"], "answers.negative")
        if good == bad:
            raise ScenarioError(f"scenario {self.name!r}: answers {self.answers['positive']!r} and "
                                f"{self.answers['negative']!r} are the same token ({good}) on {model.name}; the "
                                "decision logit[positive] - logit[negative] would be 0. Give two different words")
        return good, bad

    def check_answers(self, model) -> None:
        """Refuse, before any forward pass, answers the decision cannot read on ``model``: an
        answer word that is not a single token, or two answers that are the same token. (A
        readback scenario answers with its values: :meth:`usable` skips a value that is not
        one token, with the reason.)"""
        if self.kind != "readback":
            self.answer_ids(model)

    def _answer_tokens(self, model, old: str, new: str) -> tuple[int, int, int, int]:
        if self.kind == "readback":
            good, bad = self._word_id(model, " " + new, "value"), self._word_id(model, " " + old, "value")
            if good == bad:
                raise ScenarioError(f"scenario {self.name!r}: values {old!r} and {new!r} are the same answer token "
                                    f"({good}) on {model.name}; a readback pair needs values whose tokens differ")
            return good, bad, -1, 1
        good, bad = self.answer_ids(model)
        sign = {v: 1 for v in self.positive_values} | {v: -1 for v in self.negative_values}
        return good, bad, sign[old], sign[new]

    def pairs(self, model, n: int, seed: int = 0, context_tokens: int | None = None) -> list[Pair]:
        """``n`` pairs from variants ``seed, seed + 1, ...``. With ``context_tokens``, each
        pair gets as many few-shot examples as keep its prompt within that many tokens
        (:meth:`fit`): a long context whose field and downstream are the scenario's own."""
        n = check_int("n", n, low=0)
        seed = check_int("seed", seed)
        if context_tokens is None:
            return [self.pair(model, seed + i) for i in range(n)]
        return [self.fit(model, context_tokens, seed + i).pair(model, seed + i) for i in range(n)]

    def with_shots(self, shots: int) -> "Scenario":
        """This scenario with ``shots`` examples; a stated ``order`` repeats (or is cut) to match."""
        shots = check_int("shots", shots, low=0)
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
            if v != ref:
                self._make_pair(model, 0, ref, v)

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
                    self._make_pair(model, 0, ref, v)
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
