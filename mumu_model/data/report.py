"""What a data step skipped or repaired, and why: counted, with a few examples for the UI."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Skipped:
    """Per-reason counts of skipped (or repaired) items and up to `keep` example ids each."""

    keep: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, item_id: str, detail: str = "") -> None:
        self.counts[reason] += 1
        samples = self.examples.setdefault(reason, [])
        if len(samples) < self.keep:
            samples.append(f"{item_id}: {detail}" if detail else str(item_id))

    def update(self, other: "Skipped") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            samples = self.examples.setdefault(reason, [])
            samples.extend(other.examples.get(reason, [])[: max(0, self.keep - len(samples))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """JSON-able summary: {"total": n, "by_reason": {...}, "examples": {...}}."""
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}
