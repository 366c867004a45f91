"""Parallelism applied from outside the model (torchtitan style): process group, FSDP2, checkpointing.

The model classes (MUMUEncoder, MUMUAdapter, the SDXL UNet) know nothing about sharding. This
module wraps their repeated blocks after the model is built and LoRA-injected:

- `init_distributed`: under torchrun (WORLD_SIZE > 1) one process group, gloo on CPU, nccl on
  GPU; a single process runs without one.
- `apply_activation_checkpointing`: each UNet down/mid/up block, adapter block and encoder
  layer recomputes its activations in backward (`checkpoint_wrapper`, non-reentrant).
- `apply_fsdp`: FSDP2 `fully_shard` on each of those blocks, then on encoder / adapter / UNet,
  then on the root; bf16 parameters with fp32 gradient reduction on GPU when asked.

Collective helpers move bytes as uint8 tensors, never pickled objects.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..devices import worker_device


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> Distributed:
    """Read torchrun's environment; start a process group when there is more than one process.

    `timeout_s` bounds how long any collective waits for the slowest rank before failing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(worker_device(device))  # None: this worker's GPU (LOCAL_RANK), else the CPU
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=target if target.type == "cuda" else None,
                                timeout=timedelta(seconds=timeout_s))
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- which blocks are wrapped ---------------------------------------------------------------------


def repeated_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every block that is sharded / checkpointed on its own.

    `model` is the trainer's container with `encoder`, `adapter` and `unet`. Attribute names
    are kept so a block can be replaced in its parent (activation checkpointing wraps it).
    """
    found: list[tuple[nn.Module, str]] = []

    def each(container: nn.Module | None) -> None:
        if container is None:
            return
        for name in container._modules:
            found.append((container, name))

    unet = model.unet
    each(unet.down_blocks)
    if unet.mid_block is not None:
        found.append((unet, "mid_block"))
    each(unet.up_blocks)
    each(model.adapter.blocks)
    each(model.encoder.text_model.layers)
    each(model.encoder.vision_model.encoder.layers)  # frozen in the paper: sharding saves memory
    return found


# -- activation checkpointing ---------------------------------------------------------------------


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap each repeated block so its activations are recomputed in backward; returns the count.

    `checkpoint_wrapper` forwards attribute access to the wrapped block (the UNet reads
    `has_cross_attention` and `resnets` on its blocks) and strips its own prefix from
    state-dict keys, so checkpoints and the saved pipeline keep the plain names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    blocks = repeated_blocks(model)
    for parent, name in blocks:
        child = getattr(parent, name)
        wrapped = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent._modules[name] = wrapped
        else:
            setattr(parent, name, wrapped)
    return len(blocks)


CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def clean_name(name: str) -> str:
    """A parameter name without activation-checkpointing wrappers (the state-dict key)."""
    return name.replace(CHECKPOINT_PREFIX, "")


# -- FSDP2 ----------------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, device: torch.device, bf16: bool, replicas: int = 1) -> None:
    """Shard each repeated block, then encoder / adapter / UNet, then the root (FSDP2).

    `replicas` > 1 is HSDP: a 2-D mesh (replicate, shard) of replicas x world_size / replicas
    ranks, consecutive ranks (one node under torchrun) sharing a shard group; a `ValueError`
    when the world size is not a multiple of it.

    Blocks first so each block's parameters are gathered only while it runs; the roots then
    own what is left (embeddings, norms, projections). With bf16 on GPU, parameters are cast
    to bf16 for compute and gradients reduced in fp32; the fp32 shards stay the master weights.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip the
    # pre-backward hook). The adapter's outputs can be views of its last Linear; they are only
    # read (cross-attention keys/values, the UNet's added embedding), never modified in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMUMUAdapter\) returned a view tensor")
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    mesh = None
    if replicas > 1:
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if world % replicas:
            raise ValueError(f"hsdp_replicas={replicas} does not divide the world size {world}")
        mesh = init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    for parent, name in repeated_blocks(model):
        fully_shard(getattr(parent, name), mesh=mesh, mp_policy=policy)
    for part in (model.encoder, model.adapter, model.unet):
        fully_shard(part, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


# -- collectives ------------------------------------------------------------------------------------


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def all_gather_bytes(data: bytes, device: torch.device) -> list[bytes]:
    """Every rank's `data`, in rank order (uint8 tensors padded to the longest; no pickle)."""
    if not dist.is_initialized():
        return [data]
    world = dist.get_world_size()
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(buffer) for _ in range(world)]
    dist.all_gather(gathered, buffer)
    return [g[: int(n)].cpu().numpy().tobytes() for g, n in zip(gathered, lengths)]


def broadcast_bytes(data: bytes, device: torch.device, group: dist.ProcessGroup | None = None) -> bytes:
    """Rank 0's `data` on every rank (of `group`; None: the default group)."""
    if not dist.is_initialized():
        return data
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0, group=group)
    buffer = torch.zeros(int(length), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and data:
        buffer[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    dist.broadcast(buffer, src=0, group=group)
    return buffer.cpu().numpy().tobytes()


# How long the other ranks wait for one rank's setup work (hashing terabytes of shards or a
# 45 GB starting pipeline) instead of the training collectives' `dist_timeout_s`. A crashed rank
# still ends the wait at once: torchrun stops every worker when one fails.
SETUP_TIMEOUT_S = 24 * 3600.0


def setup_group() -> dist.ProcessGroup | None:
    """Every rank in a gloo group with `SETUP_TIMEOUT_S` (CPU tensors), for the collectives that
    follow one rank's slow setup work; None without a process group. Collective."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=SETUP_TIMEOUT_S))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
