"""Training checkpoints: sharded safetensors written by every rank, plus JSON; no pickle anywhere.

    <run dir>/checkpoints/step-00001000/
        weights/shard-0000R-model-00001-of-00001.safetensors
                    rank R's shards of the trainable weights ("model.<name>"), their EMA
                    ("ema.<name>", with EMA on) and AdamW's state ("optim.<name>.<exp_avg|...>"),
                    each with its offsets in the full tensor (torch.distributed.checkpoint's
                    Hugging Face safetensors format)
        state.json  step, run identity, config, LR scheduler, optimizer param groups, every
                    rank's data-stream position, the unusable samples found so far (so the
                    bad-data limit covers the whole run), the MLflow run id; written last

Every rank writes its own shards in parallel (`torch.distributed.checkpoint`), so no rank
gathers the model. Reading goes through the same planner, which reshards: a checkpoint written
by W processes resumes on any other number (the data positions are converted by the stream).
A checkpoint is written under a hidden `.step-N.partial` name and renamed into place once
state.json is in it, so a `step-N` folder is always complete; a run killed mid-write leaves only
the hidden folder, which the next run removes. Only trainable weights are saved: everything
frozen is rebuilt from the starting weights the run's identity names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from . import parallel

CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
WEIGHTS_DIR = "weights"
FORMAT = "mumu-train-checkpoint/2"
PARTIAL_SUFFIX = ".partial"

# One process without a process group is a supported case here, not a mistake to warn about.
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def read_state(path: str | os.PathLike) -> dict:
    """A checkpoint's state.json, or a ValueError naming the folder and what is wrong."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path}: no {STATE_FILE} (not a complete checkpoint folder)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path}: cannot read {STATE_FILE} ({err})") from err
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def _reader(path: Path):
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    weights = path / WEIGHTS_DIR
    if not any(weights.glob("*.safetensors")):
        raise ValueError(f"checkpoint {path}: no safetensors files in {WEIGHTS_DIR}/")
    return HuggingFaceStorageReader(str(weights))


def load_into(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (plain or sharded DTensors, by checkpoint name) in place from a checkpoint.

    Collective when a process group is up: every rank calls it with its own shards, whatever
    world size wrote the checkpoint. Every name must be in the checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    reader = _reader(path)
    saved = reader.read_metadata().state_dict_metadata
    missing = sorted(set(tensors) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    dcp.load(tensors, storage_reader=reader, no_dist=not parallel.is_distributed())


def load_full(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor named `prefix<name>` as a full CPU tensor keyed by `<name>`, in one process."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    reader = _reader(path)
    saved = reader.read_metadata().state_dict_metadata
    tensors = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in saved.items()
        if name.startswith(prefix)
    }
    if not tensors:
        raise ValueError(f"checkpoint {path}: no tensors named {prefix}*")
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return {name[len(prefix):]: tensor for name, tensor in tensors.items()}


def load_weights(path: str | os.PathLike, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The trainable weights (full tensors) and state.json, to export or to start stage 2 from.

    ema=None: the EMA weights if the checkpoint has them (the run's model), else the raw ones;
    True: the EMA weights (an error if there are none); False: the raw last-step weights.
    """
    state = read_state(path)
    has_ema = bool(state.get("ema"))
    if ema and not has_ema:
        raise ValueError(f"checkpoint {path}: no EMA weights (the run trained without EMA)")
    use_ema = has_ema if ema is None else ema
    return load_full(path, "ema." if use_ema else "model."), state


class CheckpointManager:
    """The checkpoints of one run: `<run dir>/checkpoints/step-N/`."""

    def __init__(self, run_dir: str | os.PathLike, total_limit: int | None = None):
        self.root = Path(run_dir) / "checkpoints"
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

    def remove_partial(self) -> list[Path]:
        """Delete the folders of checkpoints whose writing was interrupted."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(".step-") and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict, is_main: bool) -> Path:
        """Write `step-N/` (collective: every rank passes its shards; rank 0 writes state.json)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        path = self.root / checkpoint_name(step)
        partial = self.root / f".{path.name}{PARTIAL_SUFFIX}"
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / WEIGHTS_DIR).mkdir(parents=True)
        parallel.barrier()
        writer = HuggingFaceStorageWriter(str(partial / WEIGHTS_DIR), save_distributed=True)
        dcp.save(tensors, storage_writer=writer, no_dist=not parallel.is_distributed())
        parallel.barrier()  # every rank's shards are on disk
        if is_main:
            data = json.dumps({"format": FORMAT, "step": step, **state}, indent=1).encode()
            with open(partial / STATE_FILE, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if path.exists():  # the same step written again (a re-run): the new one replaces it
                shutil.rmtree(path)
            os.replace(partial, path)
            self._prune()
        return path

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        complete = self.complete()
        for _, old in complete[: max(0, len(complete) - self.total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
