"""Wall time of the toy bootstrap over 8 shards through Dagster's run queue, with 1 worker and
with 2 workers, in one run on one machine; the serial in-process run for reference.

    .venv/bin/python bench/bootstrap_workers.py [--shards 8] [--prompts 320]

Each configuration starts from an empty data folder and a fresh Dagster instance on one local
PostgreSQL server (started here by `mumu_assets.postgres`). The figures go to
bench/results/bootstrap_workers.json: total seconds, seconds in the sharded phases (what the
workers share), and the ratios 2 workers / 1 worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mumu_assets.postgres import LocalPostgres  # noqa: E402

ASSETS = ["raw_prompts", "content_style", "real_images", "synthetic_images", "scorer_model", "pickscore_scores",
          "filtered_synthetic", "detections", "multimodal_captions_stage1", "multimodal_captions_stage2"]


def write_params(folder: Path, root: Path, shards: int, prompts: int) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root), num_shards=shards)
    params["data"]["prompts"]["limit"] = prompts
    params["data"]["content_style"]["styles_per_content"] = 1
    params["pretrained"]["scorer"]["steps"] = 3
    path = folder / f"params_{root.name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def phase_seconds(output: str) -> float:
    """Seconds from each phase's queueing to its last shard, summed (the bootstrap's own log)."""
    total, queued = 0.0, None
    for line in output.splitlines():
        match = re.match(r"\[\s*(\d+) s\] (.*)", line)
        if not match:
            continue
        at, text = float(match.group(1)), match.group(2)
        if text.startswith("phase "):
            if queued is not None:
                total += last - queued
            queued = at
        elif text.startswith("shard "):
            last = at
    return total + (last - queued if queued is not None else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=320)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mumu-bench-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Its own folder: as root the server runs as `postgres`, which cannot enter `work` (mode 700).
    pg_folder = Path(tempfile.mkdtemp(prefix="mumu-postgres-"))
    server = LocalPostgres(pg_folder, port=port)
    url = server.start()
    results: dict = {}
    try:
        for workers in (1, 2):
            home = work / f"home{workers}"
            home.mkdir()
            shutil.copy(REPO / "dagster_home" / "cluster" / "dagster.yaml", home / "dagster.yaml")
            env = {**os.environ, "MUMU_PARAMS": str(write_params(work, work / f"data{workers}", args.shards, args.prompts))}
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "mumu_assets.bootstrap", "--workers", str(workers),
                                   "--home", str(home), "--database", url], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            seconds = time.monotonic() - started
            if done.returncode:
                raise SystemExit(f"{workers} worker(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results[f"workers_{workers}"] = {"total_s": round(seconds, 1),
                                             "sharded_phases_s": round(phase_seconds(done.stdout), 1)}
            print(f"{workers} worker(s): {results[f'workers_{workers}']}", flush=True)
        env = {**os.environ, "MUMU_PARAMS": str(write_params(work, work / "serial", args.shards, args.prompts)),
               "DAGSTER_HOME": str(work / "serial_home")}
        (work / "serial_home").mkdir()
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "mumu_assets.materialize", *ASSETS], cwd=REPO, env=env,
                       capture_output=True, check=True)
        results["serial_in_process_s"] = round(time.monotonic() - started, 1)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pg_folder, ignore_errors=True)
    one, two = results["workers_1"], results["workers_2"]
    results["ratio_total_2_over_1"] = round(two["total_s"] / one["total_s"], 3)
    results["ratio_sharded_2_over_1"] = round(two["sharded_phases_s"] / one["sharded_phases_s"], 3)
    results["setup"] = {"shards": args.shards, "prompts": args.prompts, "cpus": os.cpu_count(),
                        "machine": platform.machine(), "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d")}
    out = REPO / "bench" / "results" / "bootstrap_workers.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
