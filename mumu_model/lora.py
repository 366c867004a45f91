"""The SDXL UNet LoRA of MUMU: inject, export, and merge into community SDXL fine-tunes.

Paper, Table 1: the SDXL UNet is trained with a rank-8 LoRA (lr 5e-6); full fine-tuning diverged.
Paper, Finding 4: that LoRA can be merged into community SDXL fine-tunes (style models with the
same architecture) without retraining. This module provides:

- :func:`add_unet_lora` -- inject a peft LoRA into a diffusers ``UNet2DConditionModel`` exactly the
  way diffusers' ``train_text_to_image_lora_sdxl.py`` does (``unet.add_adapter(LoraConfig(...))``).
- :func:`export_unet_lora` -- write it in the diffusers LoRA format that
  ``StableDiffusionXLPipeline.load_lora_weights(dir)`` reads, *including* the ``LoraConfig`` as
  safetensors metadata, so that ``lora_alpha != r`` survives the round trip (without the metadata
  diffusers assumes ``alpha == rank``, i.e. scale 1, and silently changes the LoRA's strength).
- :func:`merge_unet_lora` -- fold an exported LoRA into *another* UNet's weights in place:
  ``W' = W + scale * (alpha / rank) * B @ A`` for every targeted Linear (the analogous
  ``einsum`` for Conv2d). The arithmetic is done directly on the safetensors state dict (no peft
  layers are ever injected), so the merged UNet is a plain UNet that saves like any other, and
  every mismatch is a clear ``ValueError`` *before* any weight is touched.
- :func:`merge_lora_into_pipeline` -- a MUMU pipeline folder whose UNet is a community UNet plus
  the MUMU LoRA.
- :func:`combine_unet_loras` (and ``export_unet_lora(..., previous=...)``) -- MUMU trains in
  stages, each starting from the previous stage's *merged* UNet with a fresh LoRA. Merging only
  the last stage's LoRA into a community UNet would lose the earlier stages, so the exported LoRA
  is the exact concatenation of every stage's LoRA: the whole change from the base UNet.
  For stages of ranks r1, r2 on one layer the result has rank r1 + r2 with
  ``A = [A1; A2]`` and ``B = [s1*B1, s2*B2]`` (``s = alpha/r`` of each stage folded into B), so
  ``B @ A = s1*B1@A1 + s2*B2@A2`` and the written ``alpha`` equals the rank (scale 1).
  :func:`lora_provenance` reads which stages a LoRA file carries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from .atomic import atomic_dir
from .devices import cast_weights

logger = logging.getLogger(__name__)

# The diffusers SDXL LoRA training default (train_text_to_image_lora_sdxl.py and
# train_dreambooth_lora_sdxl.py use exactly these): the query/key/value/output projections of
# every attention layer, self- *and* cross-attention. Cross-attention's to_k/to_v are the layers
# that read the (new, VLM+adapter) conditioning, so they must be adapted; keeping the recipe
# identical to the community default also keeps the exported file loadable by any SDXL tool.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

#: File name diffusers writes and ``load_lora_weights(dir)`` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: safetensors metadata key under which diffusers stores the (prefixed) ``LoraConfig``.
LORA_METADATA_KEY = "lora_adapter_metadata"
UNET_PREFIX = "unet"
#: safetensors metadata key of MUMU's own record: the stages a LoRA carries and its base UNet.
MUMU_METADATA_KEY = "mumu_lora"

# Key suffixes of the LoRA formats we understand -> role. Longer suffixes first.
_A_SUFFIXES = (".lora_linear_layer.down.weight", ".lora.down.weight", ".lora_down.weight", ".lora_A.weight")
_B_SUFFIXES = (".lora_linear_layer.up.weight", ".lora.up.weight", ".lora_up.weight", ".lora_B.weight")
_ALPHA_SUFFIX = ".alpha"


# --------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------


def add_unet_lora(
    unet,
    rank: int = 8,
    alpha: int | None = None,
    targets: Iterable[str] = UNET_LORA_TARGETS,
    adapter_name: str = "default",
):
    """Inject a peft LoRA (rank ``rank``, ``lora_alpha = alpha or rank``) into ``unet``; return it.

    ``init_lora_weights="gaussian"`` as in diffusers' SDXL LoRA script: A is Gaussian, B is zero,
    so the LoRA'd UNet starts out computing exactly the base UNet. Only the LoRA parameters are
    left trainable by peft's injection if the caller froze the base weights beforehand (the
    training code does ``unet.requires_grad_(False)`` first, as diffusers' script does).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(targets)
    if not targets:
        raise ValueError("LoRA needs at least one target module name")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


def has_peft_layers(module: nn.Module) -> bool:
    """True if any submodule is a peft tuner layer (a LoRA that is injected, merged or not)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def unet_lora_state(unet, adapter_name: str = "default") -> tuple[dict[str, dict], dict]:
    """``unet``'s LoRA adapter ``adapter_name`` in memory, as :func:`load_unet_lora` reads a file.

    Returns ``(modules, config)``: ``modules`` maps a UNet module name to ``{"A", "B", "alpha"}``
    (CPU copies; ``alpha`` is None, the alpha lives in ``config``), ``config`` is the adapter's
    ``LoraConfig`` as a JSON-ready dict.
    """
    from peft.utils import get_peft_model_state_dict

    peft_config = getattr(unet, "peft_config", None) or {}
    if adapter_name not in peft_config or not has_peft_layers(unet):
        raise ValueError(
            f"the UNet has no LoRA adapter named {adapter_name!r} to export "
            f"(adapters present: {sorted(peft_config) or 'none'}); call add_unet_lora(unet) first"
        )
    config = peft_config[adapter_name]
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA adapters are not supported by the MUMU LoRA export/merge")

    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if not state_dict:
        raise ValueError(f"the UNet's adapter {adapter_name!r} has no LoRA weights")
    # safetensors refuses tensors that share memory or are non-contiguous views.
    state_dict = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    modules = _parse_lora_tensors(state_dict, f"UNet adapter {adapter_name!r}")
    return modules, _jsonable(config.to_dict())


def export_unet_lora(
    unet,
    out_dir,
    adapter_name: str = "default",
    previous: str | os.PathLike | None = None,
    base: str | None = None,
) -> Path:
    """Write ``unet``'s LoRA adapter ``adapter_name`` to ``out_dir`` in the diffusers format.

    The folder holds ``pytorch_lora_weights.safetensors`` with keys
    ``unet.<module>.lora.{down,up}.weight`` and the adapter's ``LoraConfig`` in the safetensors
    metadata (``lora_adapter_metadata``), which ``load_lora_weights`` / ``load_lora_adapter`` use
    to rebuild the config, so alpha and rank both survive. The write is atomic: everything goes to
    a temporary sibling folder that is renamed into place (an existing ``out_dir`` is replaced).

    ``previous``: the exported LoRA (folder or file) of the stage(s) whose merged UNet this adapter
    was trained on. With it, the file written is ``combine_unet_loras([previous, (unet,
    adapter_name)], out_dir)``: one LoRA holding every stage, relative to the UNet the first stage
    was trained on (see :func:`combine_unet_loras` for its rank and alpha). Without it, the adapter
    is written as it is: a one-stage LoRA relative to the UNet it was trained on.

    ``base``: what that UNet is (a model folder or hub id), recorded in the ``mumu_lora``
    metadata (see :func:`lora_provenance`); with ``previous`` it defaults to the base recorded there.
    """
    if previous is not None:
        return combine_unet_loras([previous, (unet, adapter_name)], out_dir, base=base)
    modules, config = unet_lora_state(unet, adapter_name)
    provenance = {"base": base, "stages": [_stage_record(modules, config, source=None)]}
    return _save_unet_lora(out_dir, modules, config, provenance)


def _save_unet_lora(out_dir, modules: Mapping[str, dict], config: dict, provenance: dict) -> Path:
    """Write ``modules`` as diffusers' ``save_lora_weights`` would, plus MUMU's provenance record.

    Written directly (not through ``save_lora_weights``) because that cannot add metadata keys;
    the tensors' keys and the ``lora_adapter_metadata`` / ``format`` entries are the same.
    """
    from safetensors.torch import save_file

    tensors = {}
    for name, entry in sorted(modules.items()):
        tensors[f"{UNET_PREFIX}.{name}.lora.down.weight"] = entry["A"].detach().to("cpu").contiguous().clone()
        tensors[f"{UNET_PREFIX}.{name}.lora.up.weight"] = entry["B"].detach().to("cpu").contiguous().clone()
    packed = {f"{UNET_PREFIX}.{k}": v for k, v in _jsonable(config).items()}
    metadata = {
        "format": "pt",
        LORA_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
        MUMU_METADATA_KEY: json.dumps(_jsonable(provenance), sort_keys=True),
    }
    out_dir = Path(out_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / LORA_WEIGHT_NAME), metadata=metadata)
    return out_dir


def _jsonable(value):
    """Make a ``LoraConfig.to_dict()`` JSON-serialisable (sets -> sorted lists, enums -> str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        # str-enums (PeftType) are str instances; json.dumps writes their value.
        return value.value if hasattr(value, "value") and isinstance(value, str) else value
    return str(value)


# --------------------------------------------------------------------------------------------
# Reading an exported LoRA
# --------------------------------------------------------------------------------------------


def resolve_lora_file(lora_dir_or_file) -> Path:
    """The safetensors file of a LoRA given as a folder (diffusers layout) or a file path."""
    path = Path(lora_dir_or_file)
    if path.is_dir():
        candidate = path / LORA_WEIGHT_NAME
        if candidate.is_file():
            return candidate
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(
                f"LoRA folder {path} holds several .safetensors files and no {LORA_WEIGHT_NAME}: "
                f"{[p.name for p in found]}; pass the file itself"
            )
        others = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        if others:
            raise ValueError(
                f"LoRA folder {path} holds no .safetensors file (only {others}); "
                "only safetensors LoRAs are accepted (pickle files can run code)"
            )
        raise ValueError(f"LoRA folder {path} holds no {LORA_WEIGHT_NAME} (no .safetensors file at all)")
    if not path.exists():
        raise ValueError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"LoRA file {path} is not a .safetensors file; only safetensors LoRAs are accepted "
            "(pickle files can run code)"
        )
    return path


def load_unet_lora(lora_dir_or_file) -> tuple[Path, dict[str, dict], dict]:
    """Read an exported UNet LoRA.

    Returns ``(file, modules, config)`` where ``modules`` maps a UNet module name (no ``unet.``
    prefix) to ``{"A": tensor, "B": tensor, "alpha": float | None}`` and ``config`` is the stored
    ``LoraConfig`` dict of the UNet (empty if the file carries none).
    """
    file, tensors, raw_meta = _read_lora_file(lora_dir_or_file)
    config: dict = {}
    if raw_meta.get(LORA_METADATA_KEY):
        try:
            packed = json.loads(raw_meta[LORA_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"LoRA file {file} has unreadable {LORA_METADATA_KEY} metadata: {e}") from e
        prefixed = {k[len(UNET_PREFIX) + 1 :]: v for k, v in packed.items() if k.startswith(UNET_PREFIX + ".")}
        config = prefixed or ({} if any("." in k for k in packed) else packed)
    modules = _parse_lora_tensors(tensors, f"LoRA file {file}")
    _check_config(config, f"LoRA file {file}")
    return file, modules, config


def lora_provenance(lora_dir_or_file) -> dict | None:
    """MUMU's record of what an exported UNet LoRA holds, or None if the file carries none.

    ``{"base": str | None, "stages": [{"rank", "alpha", "modules", "source"}, ...]}``: the
    training stages concatenated in it, first to last (``rank``/``alpha``: the stage's most
    common rank and its alpha, ``source``: the file it was read from, None if it came from a
    model in memory), and ``base``, the UNet the whole LoRA is relative to, if the exporter was
    told. Every LoRA written by :func:`export_unet_lora` / :func:`combine_unet_loras` carries it;
    one written by another tool does not (it is then a single LoRA of unknown history).
    """
    file, _, raw_meta = _read_lora_file(lora_dir_or_file, tensors=False)
    raw = raw_meta.get(MUMU_METADATA_KEY)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA file {file} has unreadable {MUMU_METADATA_KEY} metadata: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("stages"), list) or not record["stages"]:
        raise ValueError(f"LoRA file {file}: {MUMU_METADATA_KEY} metadata has no list of stages")
    return record


def _read_lora_file(lora_dir_or_file, tensors: bool = True) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """``(file, tensors, metadata)`` of a safetensors LoRA (``tensors`` empty if not asked for)."""
    from safetensors import SafetensorError, safe_open

    file = resolve_lora_file(lora_dir_or_file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            keys = list(f.keys())
            loaded = {k: f.get_tensor(k) for k in keys} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"LoRA file {file} is not a readable safetensors file: {e}") from e
    if not keys:
        raise ValueError(f"LoRA file {file} contains no tensors")
    return file, loaded, raw_meta


def _parse_lora_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, dict]:
    """Group a flat LoRA state dict (diffusers, peft or kohya key names; an optional ``unet.``
    prefix) into ``{module: {"A", "B", "alpha"}}``; ``where`` names the source in errors."""
    # Keep the UNet's part of the file: the "unet." keys if any are prefixed, else all of them.
    if any(k.startswith(UNET_PREFIX + ".") for k in tensors):
        skipped = sorted(k for k in tensors if not k.startswith(UNET_PREFIX + "."))
        if skipped:
            logger.warning("%s: ignoring %d non-UNet keys (e.g. %s)", where, len(skipped), skipped[0])
        tensors = {k[len(UNET_PREFIX) + 1 :]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX + ".")}

    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        for role, suffixes in (("A", _A_SUFFIXES), ("B", _B_SUFFIXES), ("alpha", (_ALPHA_SUFFIX,))):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                break
        else:
            raise ValueError(
                f"{where}: key {key!r} is not a LoRA A/B/alpha weight "
                "(DoRA magnitudes, LoRA biases and other adapter types are not supported)"
            )
        name = key[: -len(suffix)]
        entry = modules.setdefault(name, {"A": None, "B": None, "alpha": None})
        entry[role] = float(value.item()) if role == "alpha" else value
    for name, entry in modules.items():
        if entry["A"] is None or entry["B"] is None:
            missing = "down/A" if entry["A"] is None else "up/B"
            raise ValueError(f"{where}: module {name!r} has no {missing} weight")
    return modules


def _check_config(config: Mapping, where: str) -> None:
    if config.get("use_dora"):
        raise ValueError(f"{where} is a DoRA adapter, which the MUMU LoRA merge does not support")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{where} has fan_in_fan_out=True, which no diffusers UNet layer uses")


def _lora_scaling(name: str, rank: int, entry: dict, config: dict) -> float:
    """peft's ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for module ``name``."""
    from peft.utils.other import get_pattern_key

    if config:
        alpha_pattern = config.get("alpha_pattern") or {}
        key = get_pattern_key(alpha_pattern.keys(), name)
        alpha = alpha_pattern.get(key, config.get("lora_alpha", rank))
    elif entry["alpha"] is not None:
        alpha = entry["alpha"]  # kohya / old diffusers "network alpha"
    else:
        alpha = rank  # diffusers' convention when a file carries no alpha: scale 1
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


def _delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``B @ A`` shaped like ``layer.weight`` (float32)."""
    A = A.to(torch.float32)
    B = B.to(torch.float32)
    if isinstance(layer, nn.Linear):
        return B @ A
    # Conv2d: A is a conv with the layer's kernel, B a 1x1 conv (peft's layout).
    return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)


def _check_shapes(file: Path, name: str, layer: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
    W = layer.weight
    if isinstance(layer, nn.Linear):
        ok = A.ndim == 2 and B.ndim == 2 and A.shape[1] == W.shape[1] and B.shape[0] == W.shape[0]
        ok = ok and A.shape[0] == B.shape[1]
    elif isinstance(layer, nn.Conv2d):
        ok = (
            layer.groups == 1
            and A.ndim == 4
            and B.ndim == 4
            and tuple(B.shape[2:]) == (1, 1)
            and A.shape[1] == W.shape[1]
            and tuple(A.shape[2:]) == tuple(W.shape[2:])
            and B.shape[0] == W.shape[0]
            and A.shape[0] == B.shape[1]
        )
    else:  # pragma: no cover - filtered earlier
        ok = False
    if not ok:
        raise ValueError(
            f"LoRA file {file}: shapes for {name!r} do not match the target UNet "
            f"(weight {tuple(W.shape)}, lora A {tuple(A.shape)}, lora B {tuple(B.shape)}); "
            "is the LoRA for a UNet of another architecture?"
        )


@torch.no_grad()
def merge_unet_lora(unet, lora_dir_or_file, scale: float = 1.0):
    """Merge an exported UNet LoRA into ``unet`` (e.g. a community SDXL fine-tune), in place.

    For every module the LoRA targets: ``W' = W + scale * (alpha / rank) * B @ A`` (computed in
    float32, stored in the weight's dtype). Every other parameter is untouched. ``unet`` must be a
    plain UNet (no injected peft layers); it stays one, so it saves like any UNet afterwards.
    All keys and shapes are validated before the first weight changes, so a failing merge leaves
    ``unet`` as it was. Returns ``unet``.
    """
    if has_peft_layers(unet):
        raise ValueError(
            "the target UNet carries injected peft/LoRA layers; merge into a plain UNet "
            "(fuse and unload its adapters first)"
        )
    file, lora, config = load_unet_lora(lora_dir_or_file)
    if not lora:
        raise ValueError(f"LoRA file {file} holds no UNet LoRA weights")

    named = dict(unet.named_modules())
    unmatched = sorted(n for n in lora if n not in named)
    if unmatched:
        raise ValueError(
            f"LoRA file {file}: {len(unmatched)} of {len(lora)} LoRA modules match no module of the "
            f"target UNet, e.g. {unmatched[:3]}; is the LoRA for a UNet of another architecture?"
        )
    plan = []
    for name, entry in sorted(lora.items()):
        layer = named[name]
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"LoRA file {file}: target {name!r} is a {type(layer).__name__}, not a Linear or Conv2d"
            )
        A, B = entry["A"], entry["B"]
        _check_shapes(file, name, layer, A, B)
        rank = A.shape[0]
        plan.append((layer, A, B, _lora_scaling(name, rank, entry, config)))

    if scale == 0:
        return unet
    for layer, A, B, scaling in plan:
        W = layer.weight
        delta = _delta(layer, A.to(W.device), B.to(W.device)) * (scale * scaling)
        W.copy_((W.to(torch.float32) + delta).to(W.dtype))
    return unet


def merge_lora_into_pipeline(pipeline_dir, lora_path, unet_path, out_dir, scale: float = 1.0) -> Path:
    """Save a MUMU pipeline whose UNet is the UNet at ``unet_path`` plus the MUMU LoRA.

    ``pipeline_dir``: a saved ``MUMUPipeline``; ``unet_path``: a community SDXL fine-tune, either a
    UNet folder or a full pipeline folder with a ``unet/`` subfolder; ``lora_path``: the MUMU UNet
    LoRA (folder or .safetensors file, see :func:`export_unet_lora`). The result is written to a
    temporary sibling of ``out_dir`` and renamed into place. Returns ``out_dir``.
    """
    from diffusers import UNet2DConditionModel

    from mumu_model.pipeline import MUMUPipeline

    pipe = MUMUPipeline.from_pretrained(pipeline_dir)
    unet_path = Path(unet_path)
    subfolder = "unet" if (unet_path / "unet").is_dir() else None
    unet = UNet2DConditionModel.from_pretrained(unet_path, subfolder=subfolder, use_safetensors=True)

    current = getattr(pipe, "unet", None)
    if current is not None:
        # The adapter feeds cross-attention, so the community UNet must read the same context.
        for key in ("cross_attention_dim", "in_channels", "out_channels", "addition_embed_type"):
            mine, theirs = current.config.get(key), unet.config.get(key)
            if mine != theirs:
                raise ValueError(
                    f"UNet at {unet_path} has {key}={theirs!r} but the MUMU pipeline at {pipeline_dir} "
                    f"expects {mine!r}; it is not a fine-tune of the same base architecture"
                )
        cast_weights(unet, current.dtype)  # not unet.to(dtype): diffusers' false float32 warning

    merge_unet_lora(unet, lora_path, scale=scale)
    pipe.register_modules(unet=unet)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(str(tmp))
    return out_dir


# --------------------------------------------------------------------------------------------
# Combining the LoRAs of successive training stages
# --------------------------------------------------------------------------------------------

#: What :func:`combine_unet_loras` takes as one stage: an exported LoRA (folder or .safetensors
#: file), a UNet carrying the peft adapter "default", ``(unet, adapter_name)``, or an in-memory
#: ``(state_dict, lora_config_dict)`` (any key format :func:`load_unet_lora` reads).
LoraSource = Union[str, os.PathLike, nn.Module, tuple]


def concat_lora_modules(
    stages: Sequence[tuple[Mapping[str, dict], Mapping]], labels: Sequence[str] | None = None
) -> dict[str, dict]:
    """Concatenate the LoRAs of successive stages into one whose delta is the sum of theirs.

    ``stages``: ``(modules, config)`` pairs as :func:`load_unet_lora` / :func:`unet_lora_state`
    return them, first stage first; ``labels`` name them in errors (default "stage 1", ...).
    For a module adapted by stages of ranks r1, r2 (scales s = alpha/r, or alpha/sqrt(r) with
    rsLoRA), the result has rank r1 + r2, ``A = [A1; A2]`` (rows) and ``B = [s1*B1, s2*B2]``
    (columns), so ``B @ A == s1*B1@A1 + s2*B2@A2``: the scales are folded into B, and the
    result's alpha equals its rank (scale 1, also what diffusers and kohya assume of a LoRA
    without alpha). A module adapted by one stage only is kept, its scale folded likewise.
    Tensors keep the inputs' promoted dtype; the folding multiplies in float32.
    Returns ``{module: {"A", "B", "alpha": rank}}``, sorted by module name.
    """
    if not stages:
        raise ValueError("no LoRA stages to combine")
    labels = list(labels) if labels is not None else [f"stage {i + 1}" for i in range(len(stages))]
    if len(labels) != len(stages):
        raise ValueError(f"{len(labels)} labels for {len(stages)} LoRA stages")

    parts: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, float]]] = {}
    for label, (modules, config) in zip(labels, stages):
        for name, entry in modules.items():
            A, B = entry["A"], entry["B"]
            _check_factors(label, name, A, B)
            scaling = _lora_scaling(name, A.shape[0], entry, dict(config or {}))
            parts.setdefault(name, []).append((label, A, B, scaling))

    combined = {}
    for name in sorted(parts):
        first_label, first_A, first_B, _ = parts[name][0]
        for label, A, B, _ in parts[name][1:]:
            if _delta_shape(A, B) != _delta_shape(first_A, first_B):
                raise ValueError(
                    f"LoRA stages disagree on module {name!r}: {first_label} changes a weight of shape "
                    f"{_delta_shape(first_A, first_B)}, {label} one of shape {_delta_shape(A, B)}; "
                    "were they trained on UNets of the same architecture?"
                )
        dtype = first_A.dtype
        for _, A, B, _ in parts[name]:
            dtype = torch.promote_types(torch.promote_types(dtype, A.dtype), B.dtype)
        A = torch.cat([A.detach().to("cpu", dtype) for _, A, _, _ in parts[name]], dim=0)
        B = torch.cat(
            [(B.detach().to("cpu", torch.float32) * s).to(dtype) for _, _, B, s in parts[name]], dim=1
        )
        combined[name] = {"A": A, "B": B, "alpha": float(A.shape[0])}
    return combined


def combine_unet_loras(sources: Sequence[LoraSource], out_dir, base: str | None = None) -> Path:
    """Write one UNet LoRA to ``out_dir`` that carries every stage in ``sources``, in order.

    Stage k's LoRA must have been trained on the UNet of stage k-1 with its LoRA merged (as MUMU's
    stage 2 starts from stage 1's merged pipeline); the written LoRA is then the whole change
    from the UNet the first stage was trained on, so merging it into a community fine-tune of
    that UNet carries every stage. The arithmetic is exact (see :func:`concat_lora_modules`):
    per module, rank = the sum of the stages' ranks, alpha = rank (scale 1). The format is
    :func:`export_unet_lora`'s; modules whose rank differs from the most common one are listed in
    the stored ``LoraConfig``'s ``rank_pattern`` and ``alpha_pattern`` (anchored, escaped module
    names), so ``load_lora_weights`` builds each layer with its own rank and scale 1.

    A source that is itself a combined LoRA contributes all its stages. ``base`` is recorded as
    the UNet the result is relative to; by default the first source's recorded base. Every
    source is read and checked before anything is written; the write is atomic. Returns
    ``out_dir``.
    """
    if not sources:
        raise ValueError("combine_unet_loras needs at least one LoRA source")
    loaded = [_load_source(source, i) for i, source in enumerate(sources)]
    modules = concat_lora_modules([(m, c) for _, m, c, _ in loaded], labels=[label for label, *_ in loaded])
    stages = [stage for *_, record in loaded for stage in record["stages"]]
    if base is None:
        base = loaded[0][3].get("base")
    return _save_unet_lora(out_dir, modules, _combined_config(modules), {"base": base, "stages": stages})


def _load_source(source: LoraSource, index: int) -> tuple[str, dict[str, dict], dict, dict]:
    """``(label, modules, config, provenance)`` of one :func:`combine_unet_loras` source."""
    if isinstance(source, nn.Module):
        source = (source, "default")
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(
                f"LoRA source #{index + 1} is a tuple of {len(source)}; expected (unet, adapter_name) "
                "or (state_dict, lora_config)"
            )
        first, second = source
        if isinstance(first, nn.Module):
            modules, config = unet_lora_state(first, second)
            label = f"UNet adapter {second!r} (source #{index + 1})"
        elif isinstance(first, Mapping):
            label = f"in-memory LoRA (source #{index + 1})"
            if hasattr(second, "to_dict"):  # a peft LoraConfig
                second = second.to_dict()
            config = _jsonable(dict(second or {}))
            modules = _parse_lora_tensors(first, label)
            _check_config(config, label)
        else:
            raise ValueError(f"LoRA source #{index + 1}: a tuple must start with a UNet or a state dict")
        if not modules:
            raise ValueError(f"{label} holds no UNet LoRA weights")
        return label, modules, config, {"base": None, "stages": [_stage_record(modules, config, None)]}
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"LoRA source #{index + 1} is a {type(source).__name__}, not a path, UNet or tuple")
    file, modules, config = load_unet_lora(source)
    if not modules:
        raise ValueError(f"LoRA file {file} holds no UNet LoRA weights")
    record = lora_provenance(file) or {"base": None, "stages": [_stage_record(modules, config, str(file))]}
    return f"LoRA file {file}", modules, config, record


def _stage_record(modules: Mapping[str, dict], config: Mapping, source: str | None) -> dict:
    """One entry of the ``mumu_lora`` metadata's ``stages``."""
    ranks = Counter(int(entry["A"].shape[0]) for entry in modules.values())
    rank = ranks.most_common(1)[0][0]
    if config:
        alpha = config.get("lora_alpha", rank)
    else:  # kohya-style per-module alphas, or none (alpha = rank)
        alphas = Counter(entry["alpha"] for entry in modules.values() if entry["alpha"] is not None)
        alpha = alphas.most_common(1)[0][0] if alphas else rank
    return {"rank": rank, "alpha": alpha, "modules": len(modules), "source": source}


def _combined_config(modules: Mapping[str, dict]) -> dict:
    """A ``LoraConfig`` dict for ``modules`` at scale 1: the most common rank as ``r``, the others
    in ``rank_pattern``, ``alpha_pattern`` mirroring it, every module named in ``target_modules``."""
    from peft import LoraConfig

    ranks = {name: int(entry["A"].shape[0]) for name, entry in modules.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # "^" + escaped name: peft matches pattern keys as regexes against the end of a module's
    # name, so an unanchored key could also match a longer name that ends the same way.
    pattern = {"^" + re.escape(name): r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
    )
    return _jsonable(config.to_dict())


def _check_factors(label: str, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    ok = A.ndim in (2, 4) and B.ndim == A.ndim and A.shape[0] == B.shape[1]
    ok = ok and (A.ndim == 2 or tuple(B.shape[2:]) == (1, 1))
    if not ok:
        raise ValueError(
            f"{label}: module {name!r} has LoRA factors that do not fit together "
            f"(A {tuple(A.shape)}, B {tuple(B.shape)}); expected A (r, in[, k, k]) and B (out, r[, 1, 1])"
        )


def _delta_shape(A: torch.Tensor, B: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight ``B @ A`` changes: (out, in) or (out, in, kh, kw)."""
    return (int(B.shape[0]), *(int(d) for d in A.shape[1:]))


__all__ = [
    "UNET_LORA_TARGETS",
    "LORA_WEIGHT_NAME",
    "MUMU_METADATA_KEY",
    "LoraSource",
    "add_unet_lora",
    "combine_unet_loras",
    "concat_lora_modules",
    "export_unet_lora",
    "has_peft_layers",
    "load_unet_lora",
    "lora_provenance",
    "merge_lora_into_pipeline",
    "merge_unet_lora",
    "resolve_lora_file",
    "unet_lora_state",
]
