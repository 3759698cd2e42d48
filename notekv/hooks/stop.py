"""Stopping a forward early, one way: a hook raises :class:`StopForward` and the caller's
:func:`stop_after` (or :func:`stopped`) block swallows it.

>>> with stop_after(model.hf.model.layers[3]):      # layers 4.. never run
...     model.hf(input_ids=ids)

``stop`` itself fits anywhere a hook function does (a PyTorch forward hook, a
TransformerLens hook, a :class:`~notekv.Hook` function), for callers that register the
hook themselves and wrap the call in :func:`stopped`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


class StopForward(Exception):
    """Raised by a hook to end the forward it fires in; never escapes :func:`stopped`."""


def stop(*_args, **_kwargs):
    """A hook function that ends the forward (raises :class:`StopForward`)."""
    raise StopForward


@contextmanager
def stopped() -> Iterator[None]:
    """Run the block; a :class:`StopForward` raised inside it ends the block quietly."""
    try:
        yield
    except StopForward:
        pass


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Run the block with the forward ending right after ``module``'s own forward (its
    forward hooks registered before this one still run); the hook is removed on exit."""
    handle = module.register_forward_hook(stop)
    try:
        with stopped():
            yield
    finally:
        handle.remove()
