"""Benchmark: does the training data keep up with the training step? (tiny profile)

One process, one run: caption shards like the trainer's (bench/training_step.py's records:
a 96 px target, a 32 px crop, a one-image prompt) and the real `Trainer` (tiny profile, paper
Table 1 modes, 64 px, batch 4, one torch thread). Measured, each after a warm-up:

- data only: `make_loader` batches per second with 0 workers (decoding in the main process)
  and with 2 worker processes (forkserver), the loader's start-up reported apart;
- step only: `Trainer.train_step` on batches fetched beforehand (VAE encode, encoder + adapter
  + UNet forward/backward, AdamW);
- end to end: fetch from the loader then step, as the training loop does, with 0 and 2 workers;
- paper-size records, data only (no step: the paper model needs a GPU): a 1024 px JPEG target
  trained at 1024 px, two 256 px PNG crops encoded at 252 px (324 tokens each), with 0 and 2
  workers; the CPU time per sample says how many workers a GPU's step rate needs.

Reported as samples/s and as ratios: data / step above 1 means the loader alone outruns the
step; end-to-end / step near 1 means the step never waits for data. Written to
bench/results/data_throughput.json.

    python bench/data_throughput.py [--batches 40] [--steps 12] [--workers 2] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun runs the trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
DEFAULT_OUT = REPO / "bench" / "results" / "data_throughput.json"


def data_only(loader, batches: int, batch_size: int) -> dict:
    """Start-up (first batch) and then samples/s over `batches` batches."""
    started = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - started
    loader.close()
    return {"startup_s": round(startup, 3), "batches": batches, "samples_per_s": round(batches * batch_size / elapsed, 1)}


def make_paper_shards(folder: Path, count: int) -> Path:
    """Records of paper size: 1024 px JPEG targets (smooth, so they compress like photos) and
    two 256 px PNG crops in the prompt."""
    import numpy as np
    from PIL import Image

    from mumu_model.data.shards import encode_image, json_bytes, write_shard

    def picture(seed: int, size: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        ramp = np.linspace(0, 1, size)
        pixels = np.stack([np.outer(ramp, ramp) * rng.uniform(80, 255), np.outer(ramp[::-1], ramp) * rng.uniform(80, 255),
                           np.outer(ramp, ramp[::-1]) * rng.uniform(80, 255)], axis=-1)
        pixels += rng.normal(0, 4, pixels.shape)  # a little texture
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    def records():
        for index in range(count):
            yield f"p{index:04d}", {
                "jpg": encode_image(picture(index, 1024), "jpg"),
                "crop0.png": encode_image(picture(10_000 + index, 256), "crop0.png"),
                "crop1.png": encode_image(picture(20_000 + index, 256), "crop1.png"),
                "json": json_bytes({"prompt": "a <img:crop0.png> man and his <img:crop1.png> dog on a beach"}),
            }

    return write_shard(folder / "00000.tar", records()).path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="each figure is the best of this many runs")
    parser.add_argument("--batches", type=int, default=50, help="timed batches of the data-only runs")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per step measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--paper-batches", type=int, default=10, help="timed batches of the paper-size runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch

    from mumu_model.atomic import write_bytes_atomic
    from mumu_model.build import build_processor
    from mumu_model.training.config import load_train_config
    from mumu_model.training.data import DataConfig, make_loader
    from mumu_model.training.trainer import Trainer
    from training_step import make_shards

    torch.set_num_threads(1)
    wall = time.perf_counter()
    settings = (0, args.workers)
    with tempfile.TemporaryDirectory(prefix="mumu-bench-") as tmp:
        tmp = Path(tmp)
        shard = make_shards(tmp / "shards", args.samples)
        config_file = tmp / "bench.yaml"
        config_file.write_text(json.dumps({
            "model_profile": "tiny", "image_size": 28, "shards": [str(shard)], "resolution": args.resolution,
            "batch_size": args.batch, "max_steps": 10_000, "warmup_steps": 0, "tracking": False,
            "output_dir": str(tmp / "run"), "seed": 0,
        }))
        trainer = Trainer(load_train_config(str(config_file)))
        processor = trainer.pipe.processor
        data_config = DataConfig(shards=(str(shard),), resolution=args.resolution, max_images=4, seed=0)
        paper_shard = make_paper_shards(tmp / "paper", (args.paper_batches + 2) * args.batch)
        paper_config = DataConfig(shards=(str(paper_shard),), resolution=1024, max_images=4, seed=0)
        paper_processor = build_processor(252)

        def steps(next_batch) -> float:
            """Median seconds of fetch + step, after the warm-up steps."""
            times = []
            for index in range(args.warmup + args.steps):
                started = time.perf_counter()
                trainer.train_step(next_batch())
                if index >= args.warmup:
                    times.append(time.perf_counter() - started)
            return statistics.median(times)

        def end_to_end(workers: int) -> float:
            loader = make_loader(data_config, processor, args.batch, num_workers=workers)
            batches = iter(loader)
            next(batches)  # start-up outside the timing
            samples_per_s = args.batch / steps(lambda: next(batches))
            loader.close()
            return round(samples_per_s, 1)

        fetched = iter(make_loader(data_config, processor, args.batch))

        # Rounds alternate the settings, so load from other work on the machine hits all alike.
        runs: dict[str, dict[str, list]] = {"step_only": {}, "data_only": {}, "end_to_end": {}, "paper_size_data_only": {}}
        for _ in range(args.rounds):
            prepared = iter([next(fetched) for _ in range(args.warmup + args.steps)])
            runs["step_only"].setdefault("batches_fetched_before", []).append(
                round(args.batch / steps(lambda: next(prepared)), 1))
            for workers in settings:
                name = f"{workers}_workers"
                runs["data_only"].setdefault(name, []).append(
                    data_only(make_loader(data_config, processor, args.batch, num_workers=workers), args.batches, args.batch))
                runs["end_to_end"].setdefault(name, []).append(end_to_end(workers))
                runs["paper_size_data_only"].setdefault(name, []).append(
                    data_only(make_loader(paper_config, paper_processor, args.batch, num_workers=workers),
                              args.paper_batches, args.batch))

    best = lambda results: max(r["samples_per_s"] if isinstance(r, dict) else r for r in results)  # noqa: E731
    step_only = best(runs["step_only"]["batches_fetched_before"])
    data = {name: best(results) for name, results in runs["data_only"].items()}
    through = {name: best(results) for name, results in runs["end_to_end"].items()}
    paper = {name: best(results) for name, results in runs["paper_size_data_only"].items()}
    ratios = {f"data_{name}_over_step": round(value / step_only, 2) for name, value in data.items()}
    ratios |= {f"end_to_end_{name}_over_step": round(value / step_only, 2) for name, value in through.items()}
    report = {
        "benchmark": "training data throughput vs the tiny training step (one process)",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "device": str(trainer.device),
            "torch_threads_main": torch.get_num_threads(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "workload": {
            "samples": args.samples, "target_px_stored": 96, "resolution": args.resolution,
            "conditioning_image_px": 28, "images_per_prompt": 1, "batch": args.batch,
            "loader": "make_loader, multiprocessing_context=forkserver, prefetch_factor=2",
            "step": "Trainer.train_step: VAE encode + forward + backward + grad clip + AdamW (tiny, Table-1 modes)",
            "timed_batches": args.batches, "timed_steps": args.steps, "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "paper_size_records": "1024 px JPEG target at resolution 1024, two 256 px PNG crops at 252 px",
            "paper_timed_batches": args.paper_batches,
        },
        "samples_per_s": {
            "data_only": data,
            "step_only": step_only,
            "end_to_end": through,
            "paper_size_data_only": paper,
        },
        "ratios": ratios,
        "paper_size_ms_per_sample": {name: round(1000 / value, 1) for name, value in paper.items()},
        "all_rounds": runs,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    write_bytes_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(json.dumps({key: report[key] for key in ("samples_per_s", "ratios", "paper_size_ms_per_sample", "wall_s")},
                     indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
