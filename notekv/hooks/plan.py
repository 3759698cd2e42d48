"""Interventions compiled to a plan, and the executor core every backend shares.

``compile_plan(model, interventions)`` asks each intervention for its operations
(:meth:`~notekv.hooks.interventions.Intervention.compile`: a list of ``(site, op)``), looks
every site up in the model's :class:`~notekv.hooks.sitemap.SiteMap` and returns a frozen
:class:`Plan` of :class:`Step` s. An executor (the native :class:`~notekv.HookLayer`, the
TransformerLens and nnsight backends) registers one hook per site of the plan and, when the
model reaches the site, calls :meth:`Executor.dispatch`, which runs the site's operations in
plan order on the activation in notekv's layout.

An operation is ``op(tensor, ctx) -> tensor | None`` (None: keep the tensor, with any
in-place change). ``ctx`` is a :class:`HookContext`: the site, the absolute slot of each
index along the position axis, the forward's step and batch size, and :meth:`HookContext.cells`,
which turns a position selector (also a per-row one) into the (row, position) cells present
in this forward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import InputError, InputTypeError
from .positions import SlotError, TokenView, resolve
from .sites import Site

if TYPE_CHECKING:  # pragma: no cover
    from .interventions import Intervention
    from .sitemap import Route


class PlanError(InputError):
    """Interventions that cannot run as asked (a hook returning a non-tensor, a per-row
    selector or source of the wrong batch size)."""


class InterventionTypeError(PlanError, InputTypeError):
    """Something passed as an intervention that is not a notekv :class:`~notekv.Intervention`."""


@dataclass(frozen=True)
class Cells:
    """The (batch row, position) cells an operation touches in one forward: ``rows``,
    ``local`` (index along the site's position axis) and ``slots`` (absolute), each ``[N]``."""

    rows: torch.Tensor
    local: torch.Tensor
    slots: torch.Tensor

    def __len__(self) -> int:
        return int(self.rows.numel())

    def index(self, site: Site, device) -> tuple:
        """Advanced index of these cells into a full activation of ``site``: the selected
        values come out as ``[N, ...]`` (the head axis kept, or dropped for a ``.h{n}`` site)."""
        rows, local = self.rows.to(device), self.local.to(device)
        if site.pos_dim == 1:
            return (rows, local)
        if site.head is None:
            return (rows, slice(None), local)
        return (rows, site.head, local)


class LayerIndex(int):
    """A layer index that is also callable, as TransformerLens's ``hook.layer()``:
    ``ctx.layer == 3``, ``ctx.layer + 1`` and ``ctx.layer()`` all work."""

    def __call__(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return int.__repr__(self)


@dataclass
class HookContext:
    """What an operation (and a :class:`~notekv.Hook` function) learns about the activation.

    ``slots``: absolute slot of each index along the site's position axis; ``step``: index
    of this forward in the context (0 = prefill); ``batch``: rows of the activation;
    ``hook_layer``: the executor running the plan; ``name``: the site as the hook was given
    it (a TransformerLens hook name such as ``"blocks.3.attn.hook_z"`` when given by one,
    else the notekv site string), as TransformerLens's ``hook.name``; ``layer``: the layer
    (None for ``embed``/``logits``), an int that is also callable as TransformerLens's
    ``hook.layer()``.
    """

    site: Site
    slots: torch.Tensor
    step: int
    hook_layer: Any
    batch: int = 1
    name: str = ""

    def __post_init__(self):
        if not self.name:
            self.name = str(self.site)

    @property
    def layer(self) -> LayerIndex | None:
        return None if self.site.layer is None else LayerIndex(self.site.layer)

    def local(self, slots: list[int] | None) -> torch.Tensor:
        """Indices along the position axis of the given absolute slots that are present here."""
        if slots is None:
            return torch.arange(len(self.slots))
        first = int(self.slots[0]) if len(self.slots) else 0
        n = len(self.slots)
        return torch.tensor([s - first for s in slots if first <= s < first + n], dtype=torch.long)

    def resolve(self, owner: object, at, tag: str = ""):
        """Absolute slots of ``at`` (resolved once per context): a list, None (all) or one
        list per batch row. Slots in the cache before the context's first forward are
        refused here unless this site covers the whole cache (``kv.*``) or ``tag`` is
        ``"src"`` (a knockout's keys)."""
        return self.hook_layer.resolve(owner, at, tag, self.site)

    def cells(self, owner: object, at, tag: str = "") -> Cells:
        """The cells of ``at`` present in this forward (every row and position for None)."""
        return self.cells_of(self.resolve(owner, at, tag), owner)

    def cells_of(self, slots, owner: object = None) -> Cells:
        """The cells of resolved ``slots`` (None, a list, or one list per row) present here."""
        n = len(self.slots)
        first = int(self.slots[0]) if n else 0
        if slots is None:
            rows = torch.arange(self.batch).repeat_interleave(n)
            local = torch.arange(n).repeat(self.batch)
            return Cells(rows, local, local + first)
        if not isinstance(slots, tuple):  # one slot set for every row: no per-row loop
            here = torch.tensor([s for s in slots if first <= s < first + n], dtype=torch.long)
            return Cells(torch.arange(self.batch).repeat_interleave(len(here)), (here - first).repeat(self.batch),
                         here.repeat(self.batch))
        if len(slots) != self.batch:
            raise PlanError(
                f"{type(owner).__name__} at {self.site}: PerRow has {len(slots)} rows but the forward has "
                f"{self.batch} batch rows; give one selector per row"
            )
        pairs = [(b, s) for b, row in enumerate(slots) for s in row if first <= s < first + n]
        if not pairs:
            empty = torch.zeros(0, dtype=torch.long)
            return Cells(empty, empty, empty)
        t = torch.tensor(pairs, dtype=torch.long)
        return Cells(t[:, 0], t[:, 1] - first, t[:, 1])


Op = Callable[[Any, HookContext], "torch.Tensor | None"]


@dataclass(frozen=True)
class Step:
    """One operation of a plan: at whole site ``site`` (reached through ``route``), ``op``,
    compiled from intervention ``owner``."""

    site: Site
    route: "Route"
    op: Op
    owner: "Intervention"

    def __repr__(self) -> str:
        return f"Step({self.site} <- {type(self.owner).__name__})"


@dataclass(frozen=True)
class Plan:
    """The compiled interventions of one context: steps in the order given, grouped by site."""

    steps: tuple[Step, ...]

    @property
    def sites(self) -> list[Site]:
        """Whole sites that need a hook, in first-use order."""
        return list(dict.fromkeys(s.site for s in self.steps))

    def __post_init__(self):
        groups: dict[Site, list[Step]] = defaultdict(list)
        for step in self.steps:
            groups[step.site].append(step)
        object.__setattr__(self, "_by_site", {k: tuple(v) for k, v in groups.items()})

    def at(self, site: Site) -> tuple[Step, ...]:
        """The steps at whole site ``site``, in plan order."""
        return self._by_site.get(site, ())

    def __repr__(self) -> str:
        return "Plan(\n" + "".join(f"  {s.site} <- {_brief(s.owner)}\n" for s in self.steps) + ")"


def _brief(iv) -> str:
    """``Patch(at=Last())``: the intervention's name and its position fields, no tensors."""
    keep = ("at", "src", "dst", "kind", "heads", "which", "scale")
    parts = [f"{k}={getattr(iv, k)!r}" for k in keep if getattr(iv, k, None) is not None]
    return f"{type(iv).__name__}({', '.join(parts)})"


def compile_plan(model, interventions, executor: str = "native") -> Plan:
    """Compile ``interventions`` for ``model`` (a HookedModel) and ``executor``.

    Raises :class:`~notekv.SiteError` for a site outside the model,
    :class:`~notekv.hooks.sitemap.UnsupportedError` (a ``NotImplementedError``) naming the
    intervention, the site and the executor for one the executor cannot reach.
    Two collections of one site both run; a Run keeps the later one.
    """
    from .interventions import Intervention
    from .sitemap import UnsupportedError

    smap = model.sitemap
    steps: list[Step] = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            shown = repr(iv) if len(repr(iv)) <= 60 else repr(iv)[:57] + "..."
            raise InterventionTypeError(f"interventions: {shown} is a {type(iv).__name__}; pass notekv "
                                        "Interventions (nk.Collect, nk.Patch, nk.Ablate, ...)")
        for s, op in iv.compile(model):
            route = smap.route(s)
            try:
                route.access(executor)
            except UnsupportedError as err:
                raise UnsupportedError(f"{type(iv).__name__}: {err}") from None
            steps.append(Step(s.whole, route, op, iv))
    return Plan(tuple(steps))


class Executor:
    """What every executor shares: the plan, selector resolution, dispatch and collection.

    Subclasses register hooks for ``plan.sites`` and call :meth:`dispatch` from them; they
    keep ``step`` (forward index), ``slots`` (absolute slots of the current forward) current.
    """

    executor = "native"

    def __init__(self, model, interventions, view: TokenView | None, horizon: int | None = None):
        self.horizon = horizon  # slots at or past it can never be reached (None: unknown)
        self.model = model
        self.spec = model.spec
        self.view = view
        self.interventions = tuple(interventions)
        self.plan = compile_plan(model, self.interventions, self.executor)
        self.collected: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.taps: dict[str, torch.Tensor] = {}  # site -> the zero tensor a Tap added there (grad=True forwards)
        self.step = -1
        self.slots = torch.arange(0)
        #: ``(first slot, length)`` of the context's first forward (its prompt); slots before
        #: the first one are the past cache, which only ``kv.*`` sites and knockout keys reach.
        self.prompt_slots: tuple[int, int] | None = None
        self._resolved: dict[tuple[int, str], object] = {}
        self._floor_checked: set = set()
        self.dispatching = 0  # > 0 while this executor runs operations (a Hook function may start a forward)

    def resolve(self, owner: object, at, tag: str = "", site: Site | None = None):
        """Resolve a selector once (at the first forward, when the prompt length is known);
        with ``site``, refuse slots that ``site`` cannot reach in this context."""
        k = (id(owner), tag)
        if k not in self._resolved:
            if self.view is None:
                n = int(self.slots[-1]) + 1 if len(self.slots) else 0
                got = resolve(at, None, n_tokens=n)
            else:
                got = resolve(at, self.view)
            self._check_slots(owner, at, got)
            self._resolved[k] = got
        got = self._resolved[k]
        if site is not None and (k, site) not in self._floor_checked:
            self._check_floor(owner, at, got, site, tag)
            self._floor_checked.add((k, site))
        return got

    def _check_floor(self, owner, at, got, site: Site, tag: str) -> None:
        """Slots before the context's first forward lie in the past cache: a site computed per
        forward (everything but ``kv.*``, and knockout queries) never sees them, so a selector
        naming them would be dropped, or half applied when it straddles the boundary."""
        from .sites import CACHE_SITES

        if got is None or self.prompt_slots is None or site.name in CACHE_SITES or tag == "src":
            return
        floor = self.prompt_slots[0]
        flat = [s for row in got for s in row] if isinstance(got, tuple) else got
        bad = [s for s in flat if s < floor]
        if bad:
            how = "apply to part of its slots only" if len(bad) < len(flat) else "never apply"
            raise SlotError(
                f"{type(owner).__name__} at {site}: {at!r} resolves to slot {bad[0]}, in the past cache (slots "
                f"0..{floor - 1}) this context does not recompute; {site} exists only from slot {floor} on, so the "
                f"intervention would {how}. Select slots of the new tokens, or edit the cached keys/values "
                "(nk.KVPatch, or the kv.k / kv.v sites)"
            )

    def check_ids(self, ids: torch.Tensor | None, slots: torch.Tensor) -> None:
        """Refuse a forward whose tokens differ from the prompt the selectors resolve on (the
        ``prompt=`` of a hook context, one view per row for a batch of different texts):
        its slots would be steered by positions found in another text. Forwards past the
        prompt's slots (decode steps) have nothing to compare."""
        if self.view is None or ids is None or not len(slots) or ids.is_floating_point():
            return
        b = ids.shape[0]
        views = self.view.row_views(b)
        if len(views) != b:
            raise PlanError(f"the prompt has {len(views)} rows (texts) but the forward has {b} batch rows; pass one "
                            "prompt per row")
        s0, n = int(slots[0]), len(slots)
        if not self.view.rows:  # one prompt for every row: one comparison
            v = self.view
            a, c = max(s0, v.start), min(s0 + n, v.start + len(v))
            want = torch.tensor(v.ids[a - v.start : c - v.start], dtype=ids.dtype, device=ids.device)
            if a >= c or bool((ids[:, a - s0 : c - s0] == want).all()):
                return
        for row, v in enumerate(views):
            a, c = max(s0, v.start), min(s0 + n, v.start + len(v))
            if a >= c:
                continue
            got = ids[row, a - s0 : c - s0].tolist()
            want = list(v.ids[a - v.start : c - v.start])
            if got != want:
                i = next(j for j, (x, y) in enumerate(zip(got, want)) if x != y)
                raise PlanError(
                    f"prompt: the forward's token at slot {a + i} (row {row}) is id {got[i]}, but the prompt "
                    f"{v.text[:60]!r} has id {want[i]} there: positions resolved on the prompt would steer other "
                    "tokens. Pass prompt= the text this forward runs (a list of texts for a batch of different "
                    "texts), or run it with model.run(text, interventions=...)"
                )

    def _check_slots(self, owner, at, got) -> None:
        """A selector must name slots that exist: none negative, none past the horizon."""
        if got is None:
            return
        flat = [s for row in got for s in row] if isinstance(got, tuple) else got
        bad = [s for s in flat if s < 0 or (self.horizon is not None and s >= self.horizon)]
        if bad:
            end = self.horizon if self.horizon is not None else "?"
            raise SlotError(
                f"{type(owner).__name__}: {at!r} resolves to slot {bad[0]}, outside the slots 0..{end if end == '?' else end - 1} "
                "this run can reach, so it would never fire; negative positions count back from the end of the "
                "prompt (Pos(-1) is its last token), and slots past the prompt exist only in generate"
            )

    def sink(self, key: str, x: torch.Tensor) -> None:
        self.collected[key].append(x)

    def dispatch(self, site: Site, t, slots: torch.Tensor | None = None):
        """Run the plan's operations at whole site ``site`` on ``t``; returns the result
        (``t`` itself when nothing replaced it)."""
        batch = t.shape[0] if isinstance(t, torch.Tensor) else getattr(t, "batch", 1)
        if self.prompt_slots is None and len(self.slots):
            self.prompt_slots = (int(self.slots[0]), len(self.slots))
        ctx = HookContext(site, self.slots if slots is None else slots, self.step, self, batch)
        frame = self._frame()
        self.dispatching += 1
        try:
            for step in self.plan.at(site):
                new = step.op(t, ctx)
                if new is None:
                    continue
                if not isinstance(new, torch.Tensor):
                    raise PlanError(f"{type(step.owner).__name__} at {site} returned {type(new).__name__}; an "
                                    "operation (or Hook function) must return a tensor of the activation's shape, "
                                    "or None")
                if new.shape != t.shape:
                    raise PlanError(f"hook at {site} returned shape {tuple(new.shape)}, expected {tuple(t.shape)}")
                t = new
        finally:
            self.dispatching -= 1
            self._restore(frame)  # a forward started by an operation (a Hook function) has its own slots
        return t

    def _frame(self):
        """What a forward started from inside an operation would overwrite (restored after)."""
        return self.step, self.slots

    def _restore(self, frame) -> None:
        self.step, self.slots = frame
