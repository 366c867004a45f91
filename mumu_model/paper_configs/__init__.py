"""The public configs (values, never weights) of the checkpoints the paper profile loads.

With these bundled, the paper architecture can be built on the meta device, sized, and tested
at its real widths without the model hub:

- ``idefics2-8b/``: HuggingFaceM4/idefics2-8b's ``config.json`` (SigLIP 27 x 1152, the
  perceiver, Mistral-7B 32 x 4096 with a 32,003-token vocabulary), ``preprocessor_config.json``
  and ``processor_config.json`` (the Idefics2 image processor and ``image_seq_len`` 64), and
  ``special_tokens.json``: the ids of its tokenizer's special tokens (the vocabulary itself is
  not bundled).
- ``sdxl-base-1.0/{unet,vae,scheduler}/``: stabilityai/stable-diffusion-xl-base-1.0's UNet,
  VAE and scheduler configs, laid out as in its repository.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).parent

# Hub id -> bundled folder, laid out like the hub repository (config.json, unet/config.json...).
KNOWN_SOURCES: dict[str, Path] = {
    "HuggingFaceM4/idefics2-8b": ROOT / "idefics2-8b",
    "stabilityai/stable-diffusion-xl-base-1.0": ROOT / "sdxl-base-1.0",
}


def known_config_dir(source: str) -> Path | None:
    """The bundled config folder of a hub id the paper uses, or None for any other source."""
    return KNOWN_SOURCES.get(source.strip().rstrip("/"))


def config_dir(source: str, field: str) -> Path:
    """Where the configs of `source` (a local folder or a known hub id) are read from.

    `field` names the config field the source came from, for the error: a hub id that is not
    bundled cannot be read without the hub.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    bundled = known_config_dir(source)
    if bundled is not None:
        return bundled
    raise ValueError(
        f"{field}={source!r}: not a local folder, and no config is bundled for that hub id "
        f"(bundled: {sorted(KNOWN_SOURCES)}); point {field} at a local copy"
    )


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def idefics2_config() -> dict:
    """HuggingFaceM4/idefics2-8b's config.json (for `Idefics2Config(**...)`)."""
    return read_json(ROOT / "idefics2-8b" / "config.json")


def idefics2_preprocessor_config() -> dict:
    """Its preprocessor_config.json (the Idefics2 image processor's settings)."""
    return read_json(ROOT / "idefics2-8b" / "preprocessor_config.json")


def idefics2_processor_config() -> dict:
    """Its processor_config.json (`image_seq_len`: 64 perceiver latents per image)."""
    return read_json(ROOT / "idefics2-8b" / "processor_config.json")


def idefics2_special_tokens() -> dict:
    """Its tokenizer's special tokens and their ids (BOS 1, `<fake_token_around_image>` 32000,
    `<image>` 32001, `<end_of_utterance>` 32002) and the base vocabulary size (32,000)."""
    return read_json(ROOT / "idefics2-8b" / "special_tokens.json")


def sdxl_config(component: str) -> dict:
    """SDXL base 1.0's "unet", "vae" (config.json) or "scheduler" (scheduler_config.json)."""
    names = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
    if component not in names:
        raise ValueError(f"unknown SDXL component {component!r}; choose from {sorted(names)}")
    return read_json(ROOT / "sdxl-base-1.0" / component / names[component])
