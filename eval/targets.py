"""Targets a model is held to: 'suite/metric' -> '>= 0.5' or '<= 0.25', checked against an
evaluation's per-suite figures. Every figure is reported, met or not."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_BOUND = re.compile(r"^\s*(>=|<=)\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class TargetResult:
    name: str        # 'suite/metric'
    bound: str       # '>= 0.5'
    value: float | None  # None: the evaluation has no such figure
    met: bool

    def line(self) -> str:
        shown = "missing" if self.value is None else f"{self.value:.3f}"
        return f"{self.name} {shown} (target {self.bound}): {'met' if self.met else 'not met'}"


def parse_targets(targets: dict[str, str]) -> dict[str, tuple[str, float]]:
    """'suite/metric' -> (operator, bound); raises ValueError naming a malformed entry."""
    parsed = {}
    for name, bound in targets.items():
        match = _BOUND.match(str(bound))
        if "/" not in name or match is None:
            raise ValueError(f"target {name!r}: {bound!r}: write it as 'suite/metric': '>= 0.5' or '<= 0.25'")
        parsed[name] = (match.group(1), float(match.group(2)))
    return parsed


def check_targets(suites: dict[str, dict[str, float]], targets: dict[str, str]) -> list[TargetResult]:
    """Each target against the figures of `suites` (suite name -> metric -> value), in the
    targets' order. A figure the evaluation lacks, or a NaN, does not meet its target."""
    results = []
    for name, (op, bound) in parse_targets(targets).items():
        suite, metric = name.split("/", 1)
        value = suites.get(suite, {}).get(metric)
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        results.append(TargetResult(name, f"{op} {bound:g}", value, met))
    return results
