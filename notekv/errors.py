"""notekv's error classes share one base, :class:`NotekvError`: a program (or the CLI) can
tell a user's mistake or a bad file, reported with what to do, from a bug.

Each concrete class also derives from the builtin it refines (``ValueError``,
``FileNotFoundError``, ``RuntimeError``...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class NotekvError(Exception):
    """Base of every error notekv raises for bad input, a bad file or an unsupported model."""


class InputError(NotekvError, ValueError):
    """An argument with a bad value: the message names the argument, the value and the fix."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong kind (``except TypeError`` still catches it)."""


class NotFoundError(InputError, KeyError):
    """A name that is not there (a skill, a gate, an uncollected site); ``except KeyError``
    still catches it."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class ConcurrencyError(NotekvError, RuntimeError):
    """A model used in a way that would let two hook contexts corrupt each other."""


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, refusing bools, floats with a fraction and out-of-range values."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}={value!r}: expected a whole number (int), got {type(value).__name__}")
    if low is not None and value < low:
        raise InputError(f"{name}={value}: must be at least {low}")
    if high is not None and value > high:
        raise InputError(f"{name}={value}: must be at most {high}")
    return value


def check_dtype(dtype):
    """``dtype`` if it is a floating torch dtype, else :class:`InputError`."""
    import torch

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype={dtype!r}: pass a floating torch dtype (torch.float32, torch.bfloat16, torch.float16)")
    return dtype


def check_device(device):
    """``device`` as a ``torch.device`` that exists on this machine, else :class:`InputError`."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r}: not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available on this machine; use device='cpu'")
    return dev
