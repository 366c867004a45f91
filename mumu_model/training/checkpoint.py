"""Training checkpoints: atomic folders of safetensors + JSON, no pickle anywhere.

    output_dir/checkpoints/step-00001000/
        model.safetensors      the trainable weights (full tensors, plain parameter names)
        ema.safetensors        their exponential moving average, same names (only with EMA on)
        optimizer.safetensors  AdamW's per-parameter tensors, "<param name>.<exp_avg|...>"
        optimizer.json         AdamW's param groups (named per module) and non-tensor state
        rng.safetensors        per rank: torch CPU (and CUDA) generator states, the noise generator
        state.json             step, config, LR scheduler, per-rank data stream and python/numpy
                               RNG states, the MLflow run id; written last

A folder is written under a temporary name and renamed into place (`atomic_dir`), so a
`step-N` folder is always complete: a run killed mid-write leaves only a hidden temp folder,
which the next run removes. Only trainable weights are saved: everything frozen is rebuilt
from the model source the config names (the checkpoint records its hash and refuses a
different one).

Rank 0 writes; the other ranks' RNG and data states reach it through `all_gather_bytes`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save, save_file

from ..atomic import atomic_dir

CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
EMA_FILE = "ema.safetensors"
FORMAT = "mumu-train-checkpoint/1"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# -- per-rank RNG state -----------------------------------------------------------------------


def capture_rng(generator: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: (JSON part, tensor part)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": keys.tolist(), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    tensors = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = meta["numpy"]
    np.random.set_state((numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["generator"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def pack_rank_state(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """One rank's state as bytes to gather: a safetensors blob whose metadata holds the JSON."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta)})


def unpack_rank_state(blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = load_safetensors_bytes(blob)
    # safetensors.torch.load drops metadata; read it from the header (8-byte length + JSON).
    header_length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_length])
    return json.loads(header["__metadata__"]["meta"]), tensors


# -- optimizer state ------------------------------------------------------------------------------


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A full optimizer state dict (parameter names as keys) as (tensors, JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    for name, entries in meta["scalars"].items():
        state.setdefault(name, {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# -- the checkpoint folder --------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read back: everything needed to continue exactly where it was written."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    state: dict  # state.json
    rank_states: list[tuple[dict, dict[str, torch.Tensor]]]  # per rank: (JSON part, tensors)
    ema: dict[str, torch.Tensor] | None = None  # EMA of the trainable weights, if the run had one


class CheckpointManager:
    def __init__(self, output_dir: str | Path, total_limit: int | None = None):
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1][1] if complete else None

    def resolve(self, resume: str | None) -> Path | None:
        """The folder `resume` names: None, "latest" (None if there is none yet) or a path."""
        if resume is None:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume={resume!r}: not a complete checkpoint folder (no {STATE_FILE})")
        return path

    def remove_partial(self) -> list[Path]:
        """Delete temp folders left by a run killed while writing a checkpoint."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(".step-") and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def save(
        self,
        step: int,
        model: dict[str, torch.Tensor],
        optimizer: dict,
        state: dict,
        rank_blobs: list[bytes],
        ema: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write `step-N/` atomically (rank 0 only), then apply `total_limit`."""
        path = self.root / checkpoint_name(step)
        metadata = {"format": FORMAT, "step": str(step)}
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous() for k, v in model.items()}, tmp / "model.safetensors", metadata=metadata)
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.items()}, tmp / EMA_FILE, metadata=metadata)
            optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer)
            save_file(optimizer_tensors, tmp / "optimizer.safetensors", metadata=metadata)
            (tmp / "optimizer.json").write_text(json.dumps(optimizer_meta, indent=1))
            rng_tensors, rank_meta = {}, []
            for rank, blob in enumerate(rank_blobs):
                meta, tensors = unpack_rank_state(blob)
                rank_meta.append(meta)
                rng_tensors.update({f"rank{rank}.{name}": value for name, value in tensors.items()})
            save_file(rng_tensors, tmp / "rng.safetensors", metadata=metadata)
            state = {"format": FORMAT, "step": step, **state, "ranks": rank_meta}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        self._prune()
        return path

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        complete = self.complete()
        for _, old in complete[: max(0, len(complete) - self.total_limit)]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: str | Path) -> Checkpoint:
        path = Path(path)
        state_file = path / STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"checkpoint {path}: cannot read {STATE_FILE} ({err})") from err
        if state.get("format") != FORMAT:
            raise ValueError(f"checkpoint {path}: format {state.get('format')!r}, expected {FORMAT!r}")
        model = load_file(path / "model.safetensors")
        optimizer = unflatten_optimizer(load_file(path / "optimizer.safetensors"),
                                        json.loads((path / "optimizer.json").read_text()))
        rng = load_file(path / "rng.safetensors")
        ema = load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
        rank_states = []
        for rank, meta in enumerate(state["ranks"]):
            prefix = f"rank{rank}."
            tensors = {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}
            rank_states.append((meta, tensors))
        return Checkpoint(path=path, step=int(state["step"]), model=model, optimizer=optimizer,
                          state=state, rank_states=rank_states, ema=ema)

    @staticmethod
    def load_weights(path: str | Path, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Only the trainable weights and state.json (to export, or start stage 2 from stage 1).

        ema=None: the EMA weights if the checkpoint has them (the run's model), else the raw ones;
        True: the EMA weights (an error if there are none); False: the raw last-step weights.
        """
        path = Path(path)
        state = json.loads((path / STATE_FILE).read_text())
        has_ema = (path / EMA_FILE).is_file()
        if ema and not has_ema:
            raise ValueError(f"checkpoint {path}: no {EMA_FILE} (the run trained without EMA)")
        use_ema = has_ema if ema is None else ema
        return load_file(path / (EMA_FILE if use_ema else "model.safetensors")), state
