"""How many units to keep, as a user writes it: a share (``50%``), a fraction (0.5) or a count (16).

Scoring reads it (learned masks train under it) as well as selection, so it sits with the scores,
below the planner.
"""

from __future__ import annotations

import math

from uspx.io import UspxError


def parse_keep(keep: int | float | str, num_experts: int) -> int:
    """Experts per layer from ``"50%"``, a fraction like 0.5, or a count like 16 / ``"16"``."""
    text = str(keep).strip()
    try:
        if text.endswith("%"):
            n = math.floor(float(text[:-1]) / 100 * num_experts + 1e-9)
        elif isinstance(keep, float) or "." in text:
            frac = float(text)
            if not 0 < frac <= 1:
                raise ValueError
            n = math.floor(frac * num_experts + 1e-9)
        else:
            n = int(text)
    except ValueError:
        raise UspxError(f"keep must be a percentage (50%), a fraction (0.5) or a count (16); got {keep!r}") from None
    if not 0 < n <= num_experts:
        raise UspxError(f"keep={keep!r} gives {n} experts per layer; it must be in 1..{num_experts}")
    return n
