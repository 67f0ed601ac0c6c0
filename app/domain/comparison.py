"""How a program's output is compared with an oracle's: exact, normalised text, numeric tolerance, or JSON
field by field. Each comparison says whether they match and, when they don't, where."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

COMPARISONS = ("exact", "normalised_text", "numeric", "json_fields")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an output matched the expected one; `details` says where it did not."""

    match: bool
    details: str = ""


def compare(kind: str, output: Any, expected: Any, tolerance: float = 1e-6) -> Verdict:
    """Compare `output` with `expected` by `kind` (one of COMPARISONS)."""
    if kind == "exact":
        return Verdict(True) if output == expected else Verdict(False, f"{_show(output)} != {_show(expected)}")
    if kind == "normalised_text":
        a, b = normalise_text(output), normalise_text(expected)
        return Verdict(True) if a == b else Verdict(False, f"{a!r:.200} != {b!r:.200} after normalising")
    if kind == "numeric":
        return _numeric(output, expected, tolerance)
    if kind == "json_fields":
        differences = list(_differences(output, expected, "", tolerance))
        return Verdict(not differences, "; ".join(differences[:10]))
    raise ValueError(f"unknown comparison {kind!r}; choose from {', '.join(COMPARISONS)}")


def normalise_text(value: Any) -> str:
    """Case-folded, NFKC-normalised text with runs of white space collapsed and the ends trimmed."""
    text = value if isinstance(value, str) else str(value)
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _numeric(output: Any, expected: Any, tolerance: float) -> Verdict:
    try:
        a, b = float(output), float(expected)
    except (TypeError, ValueError):
        return Verdict(False, f"not numbers: {_show(output)} and {_show(expected)}")
    if math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance):
        return Verdict(True)
    return Verdict(False, f"{a} differs from {b} by {abs(a - b):.6g} (tolerance {tolerance})")


def _differences(output: Any, expected: Any, path: str, tolerance: float) -> Any:
    where = path or "(root)"
    if isinstance(expected, dict) and isinstance(output, dict):
        for key in sorted(expected.keys() | output.keys()):
            if key not in output:
                yield f"{path}/{key}: missing"
            elif key not in expected:
                yield f"{path}/{key}: unexpected"
            else:
                yield from _differences(output[key], expected[key], f"{path}/{key}", tolerance)
    elif isinstance(expected, list) and isinstance(output, list):
        if len(output) != len(expected):
            yield f"{where}: {len(output)} items, expected {len(expected)}"
        for index, (a, b) in enumerate(zip(output, expected, strict=False)):
            yield from _differences(a, b, f"{path}/{index}", tolerance)
    elif _is_number(output) and _is_number(expected):
        if not math.isclose(output, expected, rel_tol=tolerance, abs_tol=tolerance):
            yield f"{where}: {output} != {expected}"
    elif output != expected:
        yield f"{where}: {_show(output)} != {_show(expected)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return repr(value)[:200]
