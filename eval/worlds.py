"""Worlds: model-free metrics, registered by the package that draws a world's images.

A suite whose images come from a procedural world (the toy world's flat coloured shapes, say)
can be scored without any model: the world knows its colours and shapes and can find them in
an output. A suite names its world (`world: toy`); worlds are found under the `mumu.worlds`
entry points (pyproject.toml), so this package imports none of them. A world provides:

- `colours`, `shapes`: the names a suite object may give as `colour` and `shape`;
- `score(image, objects) -> dict`: one output's metrics, given the entry's objects as
  (colour, shape) pairs (None where the suite names none). Numbers, or strings for what was
  seen; {} where nothing applies. A row with per-object rates also holds `n_objects`;
- `means`: the numeric metrics of `score` that a suite averages over its images;
- `rates`: {metric: "object" | "image"}: those of `means` that are binomial rates, over
  objects (`n_objects` trials a row) or over images (one a row);
- `main_metric`: the rate that ranks models on the world's suites;
- `chance(metrics) -> dict`: the chance levels of the rates a suite's metrics hold;
- `headline(metrics) -> str`: a suite's figures in one line ("" when none apply).

A world may also put the slot-binding judge's columns in `score`'s row, under the names of
`eval.binding` (`n_slots`, `slot_bound`, `all_bound`, ...): `eval.scoring` summarizes them
wherever they come from, so they need not be in `means` or `rates`.

The suite metrics `chance` and `headline` read are named as `eval.scoring` names them: each
rate with its 95% Wilson interval (`<rate>_ci_low`, `<rate>_ci_high`) and, for the text-only
ablation, every metric again with a `_text_only` suffix.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Literal, Protocol

from PIL import Image

# The entry-point group of worlds (pyproject.toml: [project.entry-points."mumu.worlds"]).
WORLD_PLUGINS = "mumu.worlds"


class World(Protocol):
    colours: Sequence[str]
    shapes: Sequence[str]
    means: Sequence[str]
    rates: Mapping[str, Literal["object", "image"]]
    main_metric: str

    def score(self, image: Image.Image, objects: Sequence[tuple[str | None, str | None]]) -> dict[str, float | str]: ...

    def chance(self, metrics: Mapping[str, float]) -> dict[str, float]: ...

    def headline(self, metrics: Mapping[str, float]) -> str: ...


def registered_worlds() -> list[str]:
    return sorted(e.name for e in entry_points(group=WORLD_PLUGINS))


@functools.lru_cache(maxsize=None)
def load_world(name: str) -> World:
    """The world registered as `name`; ValueError naming the registered ones when there is none."""
    found = entry_points(group=WORLD_PLUGINS, name=name)
    if not found:
        known = ", ".join(registered_worlds()) or "none (is the project installed with pip install -e .?)"
        raise ValueError(f"unknown world {name!r}; registered worlds: {known}")
    return next(iter(found)).load()
