"""Benchmark: one training step of the tiny model on CPU, 1 process vs 2 (torchrun, gloo, FSDP2).

Each configuration runs the real `Trainer` under `torchrun --nproc_per_node=N` (N=1 runs
without a process group or sharding, as a plain `mumu train` would): warm-up steps, then timed
steps, each timed from fetching the batch to the end of the optimizer step (data decoding,
VAE encoding, encoder + adapter + UNet forward/backward, FSDP2 all-gathers and
reduce-scatters, AdamW). The per-process batch is fixed, so 2 processes train a global batch
twice as large. Reported: median seconds per step and samples per second (global batch /
median step time).

The modes are the paper's (Table 1: ViT frozen, connector/LM/UNet LoRA r8, adapter full) on
the tiny profile at 64 px. Each process uses one thread (torchrun's default). This machine
has 2 cores shared with other work, so 2 processes compete for them with whatever else runs:
the figures say what the sharding costs on CPU, not how it scales. The full-size measurement
(paper model, 1024 px, bf16, H100s) is future work: no GPU was lent to this task.

    python bench/training_step.py [--steps 20] [--warmup 3] [--batch 4] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "training_step.json"


def worker(config_file: str, out_file: str, warmup: int, steps: int) -> None:
    """Runs inside torchrun: time `steps` training steps after `warmup`; rank 0 writes them."""
    import torch

    from mumu_model.training import parallel
    from mumu_model.training.config import load_train_config
    from mumu_model.training.trainer import Trainer

    trainer = Trainer(load_train_config(config_file))
    times, losses = [], []
    for index in range(warmup + steps):
        parallel.barrier()  # start together: a step's time is the slowest rank's
        started = time.perf_counter()
        metrics = trainer.train_step(next(trainer.batches))
        elapsed = time.perf_counter() - started
        if index >= warmup:
            times.append(elapsed)
            losses.append(metrics["loss"])
    if trainer.dist.is_main:
        Path(out_file).write_text(json.dumps({
            "world_size": trainer.dist.world_size, "step_times_s": times, "losses": losses,
            "threads": torch.get_num_threads(), "sharded": trainer.dist.sharded,
        }))
    parallel.shutdown_distributed()


def make_shards(folder: Path, count: int) -> Path:
    from PIL import Image, ImageDraw

    from mumu_model.data.shards import encode_image, json_bytes, write_shard

    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]

    def records():
        for index in range(count):
            colour = colours[index % len(colours)]
            image = Image.new("RGB", (96, 96), (120, 120, 120))
            ImageDraw.Draw(image).ellipse((24, 24, 72, 72), fill=colour)
            yield f"r{index:04d}", {
                "jpg": encode_image(image, "jpg"),
                "crop0.png": encode_image(Image.new("RGB", (32, 32), colour), "crop0.png"),
                "json": json_bytes({"prompt": "a <img:crop0.png> circle on a grey background"}),
            }

    return write_shard(folder / "00000.tar", records()).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, warmup=args.warmup, steps=args.steps)
        return

    import torch
    import yaml

    from mumu_model.atomic import write_bytes_atomic

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mumu-bench-") as tmp:
        tmp = Path(tmp)
        shard = make_shards(tmp / "shards", 64)
        config = {
            "model_profile": "tiny", "image_size": 28, "shards": [str(shard)], "resolution": args.resolution,
            "batch_size": args.batch, "max_steps": 10_000, "warmup_steps": 0, "tracking": False,
            "output_dir": str(tmp / "run"), "seed": 0,
        }
        config_file = tmp / "bench.yaml"
        config_file.write_text(yaml.safe_dump(config))
        for processes in (1, 2):
            out = tmp / f"times-{processes}.json"
            command = [torchrun, "--standalone", f"--nproc_per_node={processes}", __file__,
                       "--worker", str(config_file), str(out), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            started = time.perf_counter()
            subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
            wall = time.perf_counter() - started
            measured = json.loads(out.read_text())
            median = statistics.median(measured["step_times_s"])
            results[f"{processes}_process" + ("es" if processes > 1 else "")] = {
                "processes": processes,
                "sharding": "FSDP2 fully_shard, gloo" if measured["sharded"] else "none (single process)",
                "global_batch": args.batch * processes,
                "median_s_per_step": round(median, 4),
                "samples_per_s": round(args.batch * processes / median, 2),
                "min_s_per_step": round(min(measured["step_times_s"]), 4),
                "max_s_per_step": round(max(measured["step_times_s"]), 4),
                "first_loss": round(measured["losses"][0], 4),
                "last_loss": round(measured["losses"][-1], 4),
                "run_wall_s_including_startup": round(wall, 1),
            }
            print(f"{processes} process(es): {median * 1000:.0f} ms/step, "
                  f"{args.batch * processes / median:.1f} samples/s")

    load = os.getloadavg()
    report = {
        "benchmark": "tiny MUMU training step on CPU: 1 process vs 2 (torchrun + gloo + FSDP2)",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads_per_process": 1, "device": "cpu",
            "load_average_1m_at_end": round(load[0], 2),
        },
        "workload": {
            "model": "tiny profile (Idefics2 2+2 layers width 32/64, adapter 2x64, SDXL-layout UNet (32, 64), VAE (16, 32))",
            "modes": "paper Table 1: vision frozen, connector/text/unet LoRA r8, adapter full",
            "resolution": args.resolution, "conditioning_image_px": 28, "batch_per_process": args.batch,
            "warmup_steps": args.warmup, "timed_steps": args.steps,
            "step": "next(batches) + VAE encode + forward + backward + grad clip + AdamW (+ FSDP2 collectives)",
        },
        "results": results,
        "notes": [
            "2 cores shared with other engineers' jobs: 2 processes compete for them, so this measures "
            "FSDP2's overhead on CPU, not scaling.",
            "Full-size measurement (paper model, 1024 px, bf16, 8xH100 FSDP2) is future work: no GPU was lent to this task.",
        ],
    }
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
