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
