"""bench/gpu_check.py's dry mode (`--device cpu --tiny`): every part's code path runs and reports.

The GPU check is meant to run once, unattended, on a lent GPU; this keeps its code from rotting
between such runs. Tiny models, 1-2 steps, 64 px, on CPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    return code, json.loads(out.read_text())


def test_every_part_runs_ok_in_the_dry_mode(report, gpu_check):
    code, result = report
    assert code == 0 and result["status"] == "ok"
    assert list(result["parts"]) == list(gpu_check.PARTS)
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("message"), part.get("traceback"))
        assert part["seconds"] >= 0 and part["allotted_s"] > 0
    env = result["environment"]
    for key in ("date", "torch", "cuda", "device", "device_name", "dtype"):
        assert key in env
    assert result["mode"] == "tiny" and result["wall_s"] > 0 and result["budget_s"] == 480


def test_pipeline_figures(report):
    pipeline = report[1]["parts"]["pipeline"]
    assert set(pipeline["prompts"]) == {"text_only", "1_image", "4_images"}
    images = {label: figures["images"] for label, figures in pipeline["prompts"].items()}
    assert images == {"text_only": 0, "1_image": 1, "4_images": 4}
    for figures in pipeline["prompts"].values():
        assert figures["mumu"]["median_s"] > 0 and figures["sdxl"]["median_s"] > 0
        assert figures["ratio_median"] > 0
        assert 0 < figures["encoder_share"] <= figures["encoder_adapter_share"] < 1
    tokens = [pipeline["prompts"][label]["tokens"] for label in ("text_only", "1_image", "4_images")]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_training_figures(report):
    training = report[1]["parts"]["training"]
    assert training["modes"] == {"vision": "frozen", "connector": "lora", "text": "lora", "adapter": "full",
                                 "unet": "lora"}
    assert training["activation_checkpointing"] is True
    flops = training["flops_per_sample"]
    # Checkpointing re-runs part of the forward in backward; model FLOPs leave that out.
    assert 0 < flops["recomputed"] < flops["model"] < flops["executed"]
    batches = training["batches"]
    assert set(batches) == {"1", str(training["largest_batch_measured"])}
    for record in batches.values():
        assert record["status"] == "ok"
        assert record["step_s"] > 0 and record["samples_per_s"] == pytest.approx(record["batch"] / record["step_s"])
        assert record["estimate_peak_gib"] > 0 and record["model_tflops_per_s"] > 0
        assert "mfu" not in record  # no bf16 peak is known for a CPU


def test_bootstrap_gpu_hours(report):
    result = report[1]
    for name in ("synthesis", "pickscore", "detection"):
        part = result["parts"][name]
        assert part["seconds_per_image"] > 0
        assert part["images_per_gpu_hour"] == pytest.approx(3600 / part["seconds_per_image"])
    stages = result["bootstrap_gpu_hours"]["stages"]
    assert stages["detection"]["images"] == 5_000_000 and stages["synthesis"]["images"] == 3_000_000
    assert result["bootstrap_gpu_hours"]["gpu_hours_measured_stages"] == pytest.approx(
        sum(stage["gpu_hours"] for stage in stages.values()))


def test_a_failing_part_is_recorded_and_the_rest_runs(gpu_check, tmp_path, monkeypatch):
    def out_of_memory(check, result):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(gpu_check.RUNNERS, "synthesis", out_of_memory)
    out = tmp_path / "partial.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--parts", "synthesis,pickscore", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 1 and result["status"] == "partial"
    assert result["parts"]["synthesis"]["status"] == "oom"
    assert "out of memory" in result["parts"]["synthesis"]["message"]
    assert result["parts"]["pickscore"]["status"] == "ok"  # scored noise images instead
    assert set(result["parts"]) == {"synthesis", "pickscore"}


def test_a_spent_budget_skips_the_parts_left(gpu_check, tmp_path):
    out = tmp_path / "skipped.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--parts", "pickscore", "--budget-s", "0.001",
                           "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 1 and result["parts"]["pickscore"]["status"] == "skipped"
