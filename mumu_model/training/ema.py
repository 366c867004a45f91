"""Exponential moving average (EMA) of the trained weights, applied from the trainer.

    ema = EMA(trainable_named_params, decay=0.999)
    ...optimizer.step()...
    ema.update(step)                      # step: 0-based index of the optimizer step just taken
    with ema.swapped_in():                # sample with the EMA weights, raw weights back after
        pipe(...)
    tensors = ema.state_dict()            # full tensors by clean parameter name (collective)
    ema.load_state_dict(tensors)

Why: sampling from an average of recent weights instead of the last step's weights smooths
out the optimizer's noise, and samples better (see docs/toy_learning.md). The model knows
nothing about it: the EMA holds its own "shadow" tensor per trainable parameter, in the same
order, and only reads and (while swapped in) writes the parameters' values.

Warm-up as diffusers' `EMAModel`: the decay used at step t is min(decay, (1 + t) / (10 + t)),
so the first updates mostly follow the weights (0.1 at t=0, 0.5 at t=8) and a short run's EMA
is not dominated by the initial weights.

FSDP2: parameters are DTensors holding this rank's shard; each shadow is a DTensor with the
same mesh and placements. Updates and swaps touch only the local shards (no communication);
`state_dict` gathers full tensors (`full_tensor`, a collective: every rank calls it) and
`load_state_dict` scatters full tensors back into shards. Plain tensors work the same way
without any of that.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class EMA:
    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = list(named_params)
        self.names = [name for name, _ in named]
        if len(set(self.names)) != len(self.names):
            raise ValueError("EMA: parameter names are not unique")
        # The parameter objects themselves: under FSDP2 these are the sharded DTensors the
        # optimizer updates in place, so they stay valid for the whole run.
        self.params = [param for _, param in named]
        with torch.no_grad():
            self.shadows = [param.detach().clone() for param in self.params]

    def decay_at(self, step: int) -> float:
        """The decay for the update after optimizer step `step` (0-based), with warm-up."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> float:
        """shadow <- decay_t * shadow + (1 - decay_t) * param for every parameter; returns decay_t."""
        decay = self.decay_at(step)
        shadows = [_local(s) for s in self.shadows]
        params = [_local(p).to(s.dtype) for p, s in zip(self.params, shadows)]
        # lerp(s, p, w) = s + w * (p - s): one fused pass over all tensors.
        torch._foreach_lerp_(shadows, params, 1.0 - decay)
        return decay

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Copy the EMA weights into the parameters for the block; restore the raw weights after.

        The raw weights are kept as a copy of the local shards (one extra copy of the trainable
        weights while inside), and restored bit for bit even if the block raises.
        """
        with torch.no_grad():
            raw = [_local(p).clone() for p in self.params]
            torch._foreach_copy_([_local(p) for p in self.params], [_local(s) for s in self.shadows])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([_local(p) for p in self.params], raw)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors by parameter name. Under FSDP2 this is a collective: call it on every rank."""
        out = {}
        for name, shadow in zip(self.names, self.shadows):
            full = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
            out[name] = full.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set every shadow from full tensors by name (as `state_dict` wrote them); names must match.

        Under FSDP2 every rank passes the full tensors (each reads the checkpoint) and keeps its shard.
        """
        missing = sorted(set(self.names) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.names))
        if missing or unexpected:
            raise ValueError(f"EMA weights do not match the trained parameters "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, shadow in zip(self.names, self.shadows):
            full = tensors[name]
            if tuple(full.shape) != tuple(shadow.shape):
                raise ValueError(f"EMA weight {name}: shape {tuple(full.shape)}, expected {tuple(shadow.shape)}")
            if isinstance(shadow, DTensor):
                # Every rank holds the full tensor, so each slices its own shard: no communication.
                full = full.to(_local(shadow).device)
                sharded = distribute_tensor(full, shadow.device_mesh, shadow.placements, src_data_rank=None)
                shadow.to_local().copy_(sharded.to_local())
            else:
                shadow.copy_(full)

    def reset(self) -> None:
        """Shadows <- the current parameters (resuming a run that had no EMA yet)."""
        with torch.no_grad():
            torch._foreach_copy_([_local(s) for s in self.shadows], [_local(p) for p in self.params])
