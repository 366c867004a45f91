"""Profiles: the same asset graph, different backends.

A profile is the resources every asset uses and the assets of the `pretrained` group (the
scorer and the VAE the graph starts from): `paper` (`profiles.paper`, hub checkpoints) and
`toy` (`profiles.toy`, the embedded default: a rendered world whose models the graph trains).
The profile is $MUMU_PROFILE, else the `profile` of the params file (params.yaml: `toy`;
params.paper.yaml: `paper`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..params import params
from . import paper, toy


@dataclass(frozen=True)
class Profile:
    resources: dict
    pretrained: list  # the assets (or external specs) with keys scorer_model and vae_model


PROFILES = {
    "paper": Profile(paper.RESOURCES, paper.PRETRAINED),
    "toy": Profile(toy.toy_resources(), toy.PRETRAINED),
}


def current_profile() -> str:
    return os.environ.get("MUMU_PROFILE") or params(group="profile") or "toy"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown MUMU_PROFILE {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[name]


def resources_for(profile: str) -> dict:
    return dict(get_profile(profile).resources)
