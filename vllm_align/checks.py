"""The validation primitives every configuration shares (no vLLM, no torch).

``AlignConfigError`` and the number checks used by the request/engine
configuration (``vllm_align.config``) and MARA's (``vllm_align.mara``). They
live below both so that neither imports the other's module to raise the same
error.
"""

from __future__ import annotations

import math
from typing import Any

# The engine computes in float32: a parameter is refused unless it survives
# the conversion (no overflow to inf, no underflow of a positive value to 0),
# and DeRa's mix is clamped to this range (``methods.dera_logits``).
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without torch
FLOAT32_TINY = 1.1754943508222875e-38  # smallest positive normal float32


class AlignConfigError(ValueError):
    """Bad alignment configuration or request parameters."""


def finite_number(value: Any, name: str, bound: float = FLOAT32_MAX) -> float:
    """``value`` as a float with ``|value| <= bound`` (default: the float32 range).

    Refuses bools, non-numbers, NaN and infinities, and finite values beyond
    ``bound``: a float64 such as 1e308 is finite in Python but not where the
    engine computes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AlignConfigError(f"alignment {name!r} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range, e.g. a 400-digit JSON literal
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value) or abs(value) > bound:
        raise AlignConfigError(
            f"alignment {name!r} must be finite and within [-{bound:.7g}, {bound:.7g}], "
            f"got {value!r}")
    return value


def unit_number(value: Any, name: str, *, low_open: bool, high_open: bool) -> float:
    """A float in the unit interval, open or closed at either end, valid in float32.

    A positive value below float32's smallest normal would become 0 (or a
    denormal) in the engine, which the open lower end excludes: it is refused.
    """
    x = finite_number(value, name)
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    inside = (x > 0.0 if low_open else x >= 0.0) and (x < 1.0 if high_open else x <= 1.0)
    if not inside or 0.0 < x < FLOAT32_TINY:
        raise AlignConfigError(
            f"alignment {name!r} must be in {lo}0, 1{hi}"
            + (f" and 0 or at least {FLOAT32_TINY:.7g} (float32)" if inside else "")
            + f", got {x!r}")
    return x
