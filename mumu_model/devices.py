"""Which accelerator a worker process runs its models on, and in which weight dtype.

On a multi-GPU host many workers run side by side, one per GPU, started by torchrun, Slurm,
Ray or a run launcher. Each must use its own GPU: a bare "cuda" is the current device, GPU 0
unless someone called `torch.cuda.set_device`, so N workers would all land on GPU 0. Every
`device` setting ("auto", "cuda", "cuda:N", "cpu", "mps") is resolved here instead.

This worker's device, a GPU among those CUDA lets it see, is:
- `MUMU_DEVICE` when set (e.g. "cuda:3", or "cpu"): a launcher's explicit pin for this worker;
- else, when `MUMU_DEVICE_POOL` lists the devices that a run queue's workers share on this host
  (e.g. "cuda:0,cuda:1"), the first one no other live process holds: a lease (an flock on
  `MUMU_DEVICE_LEASES/<i>.lock`) kept until the process exits, however it exits. The queue
  bounds how many workers run at once; the lease says which device each one gets;
- else `cuda:<LOCAL_RANK>` (torchrun), or `cuda:<SLURM_LOCALID>` (srun) when LOCAL_RANK is unset;
- else, or when that index is past the visible devices while `CUDA_VISIBLE_DEVICES` is set,
  `cuda:0`: the launcher already narrowed the visible set to this worker's GPUs (Ray GPU
  actors, one GPU per Kubernetes pod, Slurm `--gpus-per-task`), so the first one is its own.

`resolve_device_dtype` turns what a user typed (a device and a dtype name) into both.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from itertools import chain
from pathlib import Path

import torch

DEVICE_ENV = "MUMU_DEVICE"
POOL_ENV = "MUMU_DEVICE_POOL"
LEASES_ENV = "MUMU_DEVICE_LEASES"
# How long a worker waits for a device another worker is about to release (its process exiting).
LEASE_WAIT_S = 120.0
# torchrun sets LOCAL_RANK; srun sets SLURM_LOCALID (also around torchrun, which then wins).
LOCAL_INDEX_ENVS = ("LOCAL_RANK", "SLURM_LOCALID")
_DEVICE_HELP = "use auto, cpu, cuda, cuda:N or mps"


def worker_device(requested: str | None = "auto", setting: str = "device") -> str:
    """The device this worker should run on, as a string for `.to()`: "cpu", "cuda:N" or "mps".

    `requested`:
    - "auto" or None: `MUMU_DEVICE` if set, else this worker's GPU (module docstring) when CUDA
      is available, else "cpu";
    - "cuda": this worker's GPU, never silently GPU 0 (`MUMU_DEVICE` counts when it names a
      CUDA device); a `ValueError` without CUDA;
    - "cuda:N", "cpu", "mps": honoured as given.

    `setting` names where `requested` came from (a flag, a config field) in error messages.
    Raises `ValueError`, in one line naming the setting or environment variable, for a value
    that is not a device, a CUDA device this machine does not have, or a local rank past the
    visible GPUs (more workers on this host than GPUs).
    """
    name = "auto" if requested is None else str(requested).strip().lower()
    pinned = os.environ.get(DEVICE_ENV, "").strip().lower()
    if pinned in ("auto", "cuda"):  # the same as unset: resolved from the rank below
        pinned = ""
    if not pinned and name in ("auto", "cuda") and os.environ.get(POOL_ENV, "").strip():
        pinned = _pool_device()
    if name == "auto":
        if pinned:
            return _checked(pinned, DEVICE_ENV if DEVICE_ENV in os.environ else POOL_ENV)
        return f"cuda:{_assigned_cuda_index()}" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting} {requested!r}: CUDA is not available on this machine; use cpu")
        if pinned.startswith("cuda"):
            return _checked(pinned, DEVICE_ENV)
        return f"cuda:{_assigned_cuda_index()}"
    return _checked(name, setting, shown=requested)


_lease: tuple[str, object] | None = None  # (device, the open lock file) for this process's life


def lease_device(pool: list[str], folder: str | Path, wait_s: float = LEASE_WAIT_S) -> str:
    """Hold the first device of `pool` that no other live process holds, for the rest of this
    process's life; the same device on later calls. Lock files in `folder` (one per pool slot)
    are released by the OS when a holder exits, even by SIGKILL. Raises `RuntimeError` naming
    the pool after `wait_s` seconds with every device held (more workers than devices)."""
    global _lease
    if _lease is not None:
        return _lease[0]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for slot, device in enumerate(pool):
            handle = open(folder / f"{slot}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _lease = (device, handle)
            return device
        if time.monotonic() > deadline:
            raise RuntimeError(f"{POOL_ENV}={','.join(pool)}: every device is held by another worker after "
                               f"{wait_s:.0f} s; run at most {len(pool)} workers on this host")
        time.sleep(0.1)


def _pool_device() -> str:
    pool = [part.strip().lower() for part in os.environ[POOL_ENV].split(",") if part.strip()]
    folder = os.environ.get(LEASES_ENV) or Path(tempfile.gettempdir()) / "mumu-device-leases"
    return lease_device(pool, folder)


def check_worker_devices(workers: int, devices_per_worker: int = 1, setting: str = "workers") -> list[str]:
    """Check that `workers` processes, each given `devices_per_worker` GPUs, fit this host.

    Returns, per worker, the `CUDA_VISIBLE_DEVICES` value to start it with (its own GPUs, taken
    in order from the devices this process sees, so an outer restriction is kept). With
    `devices_per_worker=0` the workers run on the CPU and each value is "" (no GPU).

    Raises `ValueError`, naming `setting`, when the host has fewer visible GPUs than
    `workers * devices_per_worker`: the launcher fails at once instead of starting workers that
    would share or miss a GPU. Only counts devices; nothing is allocated.
    """
    if workers < 1:
        raise ValueError(f"{setting}={workers}: need at least 1 worker")
    if devices_per_worker < 0:
        raise ValueError(f"devices_per_worker={devices_per_worker}: must be 0 (CPU workers) or more")
    if devices_per_worker == 0:
        return [""] * workers
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    need = workers * devices_per_worker
    if need > count:
        per = "" if devices_per_worker == 1 else f" x {devices_per_worker} GPUs each"
        fit = count // devices_per_worker
        hint = f"lower {setting} to at most {fit}" if fit else "run on a host with more GPUs, or CPU workers"
        raise ValueError(f"{setting}={workers}{per} needs {need} GPU(s), but this host has {count} visible; {hint}")
    visible = _visible_device_ids(count)
    return [
        ",".join(visible[i * devices_per_worker:(i + 1) * devices_per_worker]) for i in range(workers)
    ]


def _checked(name: str, setting: str, shown: str | None = None) -> str:
    """`name` as a device string, if this machine has it; errors quote `shown` (default `name`)."""
    shown = name if shown is None else shown
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{setting} {shown!r}: not a device; {_DEVICE_HELP}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting} {shown!r}: CUDA is not available on this machine; use cpu")
        count = torch.cuda.device_count()
        if parsed.index >= count:
            raise ValueError(
                f"{setting} {shown!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{setting} {shown!r}: MPS is not available on this machine; use cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{setting} {shown!r}: not supported; {_DEVICE_HELP}")
    return str(parsed)


def _assigned_cuda_index() -> int:
    """This worker's GPU among the visible ones (module docstring); CUDA must be available."""
    count = torch.cuda.device_count()
    for variable in LOCAL_INDEX_ENVS:
        value = os.environ.get(variable, "").strip()
        if value:
            break
    else:
        return 0
    try:
        index = int(value)
    except ValueError:
        raise ValueError(f"{variable}={value!r}: not a local rank (a whole number from 0)") from None
    if index < 0:
        raise ValueError(f"{variable}={value!r}: not a local rank (a whole number from 0)")
    if index < count:
        return index
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return 0  # the launcher narrowed visibility to this worker's own GPU(s)
    raise ValueError(
        f"{variable}={index}: this host has {count} visible CUDA device(s), cuda:0 to cuda:{count - 1}; "
        f"start at most {count} workers per host, or give each its GPU with CUDA_VISIBLE_DEVICES"
    )


def _visible_device_ids(count: int) -> list[str]:
    """The ids a child's CUDA_VISIBLE_DEVICES takes for this process's visible devices 0..count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in listed.split(",") if part.strip()]
    return ids[:count]


# The weight dtypes a pipeline runs in, by name (the same three as `build.DTYPES`).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device_dtype(
    device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[str, torch.dtype]:
    """The device and weight dtype to run a pipeline in, from what a user typed.

    `device`: "cpu", "cuda:N", "mps", or None / "auto" / "cuda" for this worker's GPU
    ("cuda:<i>" from MUMU_DEVICE, LOCAL_RANK or CUDA_VISIBLE_DEVICES, see `mumu_model.devices`)
    when `torch.cuda.is_available()`, else cpu ("cuda" then fails). `dtype`: "float32",
    "bfloat16" or "float16" (also fp32, bf16, fp16) or a `torch.dtype`; None: bfloat16 on cuda,
    float32 elsewhere.

    Returns (device string, torch dtype). Raises `ValueError`, in one line naming the value, for
    an unknown device or dtype, a device this machine does not have, or float16 on the CPU
    (many CPU kernels lack it; bfloat16 works there).
    """
    parsed = torch.device(worker_device(device, setting="device"))

    if dtype is None:
        resolved = torch.bfloat16 if parsed.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        key = str(dtype).strip().lower().removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r}: unknown; use {', '.join(DTYPE_NAMES)}")
        resolved = getattr(torch, key)
    if resolved not in tuple(getattr(torch, n) for n in DTYPE_NAMES):
        raise ValueError(f"dtype {dtype!r}: unsupported; use {', '.join(DTYPE_NAMES)}")
    if resolved == torch.float16 and parsed.type == "cpu":
        raise ValueError(f"dtype float16 on device {str(parsed)!r}: not supported on the CPU; use float32 or bfloat16")
    return str(parsed), resolved


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast `model`'s floating-point weights to `dtype` in place, as `from_pretrained(torch_dtype=)`
    would: the modules a diffusers or transformers model lists in `_keep_in_fp32_modules` stay
    in float32, and a model already in `dtype` is left alone. Returns `model`.

    Not `model.to(dtype)`: diffusers' `ModelMixin.to` warns on every dtype cast that "modules
    ... should be kept in float32", even for models that list none (`[]`), which is every MUMU
    model; the modules it would protect are kept here.
    """
    weights = [t for t in chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not keep and all(t.dtype == dtype for t in weights):
        return model
    torch.nn.Module.to(model, dtype=dtype)
    if keep and dtype != torch.float32:
        for name, module in model.named_modules():
            if any(part in keep for part in name.split(".")):
                torch.nn.Module.to(module, dtype=torch.float32)
    return model


def cast_pipeline(pipe, dtype: torch.dtype):
    """`cast_weights` on every model of a diffusers pipeline (the processor and scheduler have
    no weights); returns `pipe`. What `pipe.to(dtype=dtype)` does, without its false warnings."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cast_weights(component, dtype)
    return pipe
