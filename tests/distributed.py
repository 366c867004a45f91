"""Launching a driver script on two local CPU processes with torchrun, as the tests do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def torchrun_two(driver: Path, *args: str, **popen) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 driver args...` from the repository root, one
    thread per process, in a session of its own; `popen` goes to subprocess.Popen."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found beside the Python interpreter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", str(driver), *map(str, args)],
                            cwd=REPO, env=env, start_new_session=True, **popen)


def run_two(driver: Path, *args: str, timeout: float) -> tuple[int, str]:
    """torchrun_two to the end: (exit status, stdout and stderr together)."""
    process = torchrun_two(driver, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = process.communicate(timeout=timeout)[0]
    finally:
        process.kill()
    return process.returncode, output


def driver_files(tmp_path: Path, config, source: str, name: str = "train") -> tuple[Path, Path]:
    """`config` as a YAML file and a driver script `source` beside it, for a run in other processes."""
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text(source)
    return config_file, driver
