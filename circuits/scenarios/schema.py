"""The scenario file format: its keys and kinds, and the checks that turn a parsed TOML
table into a :class:`~circuits.scenarios.scenario.Scenario` (every error names the file and
the key)."""

from __future__ import annotations

from pathlib import Path

from .errors import ScenarioError
from .pair import REGIONS
from .scenario import Scenario

KINDS = ("gate", "readback", "polarity")
REQUIRED = ("name", "kind", "field", "positive_values", "negative_values", "policy", "query")
OPTIONAL = ("description", "answers", "shots", "example", "query_request", "requests", "names", "edit",
            "order", "example_negatives", "value_pairs", "example_region")
EDIT_REQUIRED = ("line", "cue", "requests")
EDIT_OPTIONAL = ("shots", "negative_values")


def parse(raw: dict, path: str | Path) -> Scenario:
    """The :class:`Scenario` of the TOML table ``raw`` read from ``path``; raises
    :class:`ScenarioError` naming ``path`` and the bad key."""
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
    both = [v for v in raw["positive_values"] if v in raw["negative_values"]]
    if both:
        raise ScenarioError(f"{path}: value(s) {both} are in both 'positive_values' and 'negative_values'; the rule "
                            "must give each value one answer, so list each value on one side only")
    if raw["kind"] not in KINDS:
        raise ScenarioError(f"{path}: kind {raw['kind']!r}; choose one of {list(KINDS)}")
    if "value_pairs" in raw:
        vp = raw["value_pairs"]
        known = set(raw["positive_values"]) | set(raw["negative_values"])
        if (not isinstance(vp, list) or not vp or not all(isinstance(x, list) and len(x) == 2 for x in vp)
                or not all(isinstance(v, str) and v in known for x in vp for v in x)):
            raise ScenarioError(f"{path}: key 'value_pairs' must be a list of [old, new] pairs of the scenario's "
                                f"positive/negative values, got {vp!r}")
        same = [x for x in vp if x[0] == x[1]]
        if same:
            raise ScenarioError(f"{path}: key 'value_pairs' holds {same[0]!r}, a pair whose old and new values are "
                                "equal: nothing would change between OLD and NEW; give two different values")
        if raw["kind"] != "readback":
            pos = set(raw["positive_values"])
            one_side = [x for x in vp if (x[0] in pos) == (x[1] in pos)]
            if one_side:
                raise ScenarioError(f"{path}: key 'value_pairs' holds {one_side[0]!r}, two values the rule answers "
                                    "alike: a pair needs one positive and one negative value (old -> new, either "
                                    "direction)")
        raw["value_pairs"] = tuple(tuple(x) for x in vp)
    if "answers" in raw:
        a = raw["answers"]
        if (not isinstance(a, dict) or set(a) - {"positive", "negative"}
                or not all(isinstance(v, str) and v.strip() for v in a.values())):
            raise ScenarioError(f"{path}: key 'answers' must be a table of non-empty answer words, "
                                f"answers = {{ positive = \" yes\", negative = \" no\" }}; got {a!r}")
        if {"positive", "negative"} <= set(a) and a["positive"].strip() == a["negative"].strip():
            raise ScenarioError(f"{path}: key 'answers' gives the same word {a['positive']!r} / {a['negative']!r} "
                                "for both sides; the decision s = logit[positive] - logit[negative] would be 0 "
                                "whatever the field says. Give two different answer words")
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
        _check_edit(e, raw, path)
    for k in ("positive_values", "negative_values", "requests", "names"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return Scenario(**raw)


def _check_edit(e: dict, raw: dict, path) -> None:
    """The ``[edit]`` table's values: texts, lists of texts, a shot count, and negative values
    that are not positive ones."""
    for k in ("line", "cue"):
        if not isinstance(e[k], str) or not e[k].strip():
            raise ScenarioError(f"{path}: key {k!r} in [edit] must be a non-empty string, got {e[k]!r}")
    for k in ("requests", "negative_values"):
        if k in e and (not isinstance(e[k], list) or not e[k]
                       or not all(isinstance(v, str) and v.strip() for v in e[k])):
            raise ScenarioError(f"{path}: key {k!r} in [edit] must be a non-empty list of non-empty strings, "
                                f"got {e[k]!r}")
    if "shots" in e and (isinstance(e["shots"], bool) or not isinstance(e["shots"], int) or e["shots"] < 0):
        raise ScenarioError(f"{path}: key 'shots' in [edit] must be a whole number >= 0, got {e['shots']!r}")
    both = [v for v in e.get("negative_values", []) if v in raw["positive_values"]]
    if both:
        raise ScenarioError(f"{path}: [edit] negative_values {both} are positive values too; list each value on "
                            "one side only")
