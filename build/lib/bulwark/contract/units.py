"""Units of the job contract: ε as papers write it (torch-free, imports nothing of Bulwark)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def parse_epsilon(value: Any) -> float:
    """Accept 0.03137, "0.03137" or "8/255" (the way papers write it)."""
    if isinstance(value, bool):
        raise ValueError("epsilon must be a number or a fraction such as '8/255'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            den = float(m.group(2))
            if den == 0:
                raise ValueError("epsilon fraction has a zero denominator")
            return float(Fraction(m.group(1)) / Fraction(m.group(2)))
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"epsilon must be a number or a fraction such as '8/255', got {value!r}")
