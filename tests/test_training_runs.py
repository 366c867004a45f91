"""A training run's identity: new data or a new recipe starts a new run, the same run resumes;
bad starting points and data that changes under a run fail clearly; ranks never wait on rank 0's
export; a checkpoint written by two processes resumes on one.

Tiny model, 32 px, one thread per process (see test_training.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from mumu_model.data.shards import write_shard
from mumu_model.training.checkpoint import CheckpointManager, load_full
from mumu_model.training.trainer import DataChanged, Trainer

from .distributed import run_two, torchrun_two
from .test_training import FULL, records, tiny

REPO = Path(__file__).resolve().parents[1]


def write_data(folder: Path, count: int = 4, offset: int = 0) -> Path:
    """One shard in `folder`; `offset` changes the records' pixels and so the data's version."""
    folder.mkdir(parents=True, exist_ok=True)
    shard = folder / "00000.tar"
    items = list(records(count + offset))[offset:]
    write_shard(shard, ((f"r{i:03d}", sample) for i, (_, sample) in enumerate(items)))
    return shard


def runs_of(output_dir) -> list[Path]:
    return sorted((Path(output_dir) / "runs").iterdir())


def test_new_data_starts_a_new_run_and_the_same_run_resumes(tmp_path, caplog):
    data = tmp_path / "data"
    write_data(data)
    fields = dict(max_steps=2, checkpoint_every=1, resume="latest", tracking=True,
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = Trainer(tiny(tmp_path, data, **fields)).train()
    assert first.new_run and first.step == 2
    first_files = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*") if p.is_file()}

    # The same config and data again: the same run, nothing left to train.
    again = Trainer(tiny(tmp_path, data, **fields))
    assert again.run_id == first.run_id and again.step == 2 and not again.new_run

    # New captions (another seed's records: new data version): a new run from step 0, its own
    # folder and MLflow run, and the log says what differs; the old run is untouched.
    write_data(data, offset=1)
    caplog.set_level("INFO", logger="mumu.training")
    trainer = Trainer(tiny(tmp_path, data, **fields))
    assert trainer.step == 0 and trainer.new_run and trainer.run_id != first.run_id
    assert f"differs from the previous run {first.run_id}" in caplog.text and "data version" in caplog.text
    second = trainer.train()
    assert second.step == 2 and second.mlflow_run_id != first.mlflow_run_id
    assert {p.name for p in runs_of(tmp_path / "run")} == {first.run_id, second.run_id}
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*") if p.is_file()} == first_files
    # output_dir/pipeline now shows the new run's export.
    assert (tmp_path / "run" / "pipeline").resolve() == (second.run_dir / "pipeline").resolve()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=fields["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags["mumu.run_id"] for r in runs} == {first.run_id, second.run_id}
    versions = {r.data.tags["mumu.run_id"]: r.data.tags["data_version"] for r in runs}
    assert versions[first.run_id] != versions[second.run_id]


def test_a_changed_learning_rate_starts_a_new_run_and_explicit_resume_names_the_difference(tmp_path):
    shard = write_data(tmp_path / "data")
    first = Trainer(tiny(tmp_path, shard, max_steps=1, resume="latest")).train()
    other = Trainer(tiny(tmp_path, shard, max_steps=1, resume="latest", unet_lr=1e-3))
    assert other.run_id != first.run_id and other.step == 0
    with pytest.raises(ValueError, match=r"belongs to another run.*unet_lr 5e-06 -> 0\.001"):
        Trainer(tiny(tmp_path, shard, max_steps=1, unet_lr=1e-3, resume=str(first.checkpoint)))
    # Fields that do not change the weights do not change the run.
    same = Trainer(tiny(tmp_path, shard, max_steps=1, resume="latest", log_every=5, checkpoint_every=7))
    assert same.run_id == first.run_id and same.step == 1


def test_incomplete_init_from_and_changed_data_fail_clearly(tmp_path):
    shard = write_data(tmp_path / "data")
    result = Trainer(tiny(tmp_path / "a", shard, max_steps=1)).train()
    broken = tmp_path / "broken"
    shutil.copytree(result.pipeline_dir, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"init_from=.*broken.*incomplete: no \*\.safetensors weights in .*unet"):
        Trainer(tiny(tmp_path / "b", shard, init_from=str(broken)))

    trainer = Trainer(tiny(tmp_path / "c", shard, max_steps=2))
    trainer.train_step(next(trainer.batches))
    write_data(tmp_path / "data", offset=1)  # the shard is rewritten while the run reads it
    with pytest.raises(DataChanged, match=r"training shard .*00000\.tar changed on disk"):
        trainer.save_checkpoint()


SLOW_EXPORT = '''
import sys, time
from mumu_model.training import trainer as module
from mumu_model.training.config import load_train_config

export = module.export_final


def slow_export(*args, **kwargs):  # longer than the process group's timeout
    time.sleep(float(sys.argv[2]))
    return export(*args, **kwargs)


module.export_final = slow_export
if __name__ == "__main__":  # data workers start in fresh processes that import this file
    module.train(load_train_config(sys.argv[1]))
'''


def test_other_ranks_leave_while_rank_0_exports_past_the_timeout(tmp_path):
    shard = write_data(tmp_path / "data")
    config = tiny(tmp_path, shard, max_steps=2, dist_timeout_s=8, data_workers=2, **FULL)  # worker processes too
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_EXPORT)
    code, output = run_two(driver, config_file, "16", timeout=280)
    assert code == 0, output[-5000:]
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_two_process_checkpoint_resumes_on_one_process(tmp_path):
    """Sharded checkpoints reshard: killed at 2 processes, continued on 1 with the same global batch."""
    shard = write_data(tmp_path / "data", count=8)
    fields = dict(max_steps=6, checkpoint_every=2, batch_size=2, global_batch_size=4, conditioning_dropout=0.5,
                  augment_probability=0.5, resume="latest", **FULL)
    reference = Trainer(tiny(tmp_path / "ref", shard, **fields)).train()  # 1 process, 2 micro-batches a step

    killed = tiny(tmp_path / "killed", shard, **fields)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed.to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom mumu_model.training.trainer import run\nrun(sys.argv[1], [])\n")
    process = torchrun_two(driver, config_file, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = Path(killed.output_dir) / "runs"
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/checkpoints/step-00000002")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun starts its workers in sessions of their own: kill them, then the agent.
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stderr = process.stderr.read().decode()
    (run,) = runs.iterdir()
    steps = [step for step, _ in CheckpointManager(run).complete()]
    assert steps and max(steps) < 6, stderr[-3000:]
    assert json.loads((run / "checkpoints" / f"step-{max(steps):08d}" / "state.json").read_text())["world_size"] == 2

    resumed = Trainer(killed)  # one process, resume=latest: the same run
    assert resumed.run_id == reference.run_id and resumed.step == max(steps)
    result = resumed.train()
    ours, theirs = load_full(result.checkpoint, "model."), load_full(reference.checkpoint, "model.")
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"killed at step {max(steps)} on 2 processes, resumed on 1: max abs weight difference {worst:.3g}")
    # Summation order differs (two ranks' mean vs two micro-batches), and Adam turns the float
    # noise of near-zero gradients into updates of up to lr; the run moved weights by ~6 x lr.
    start = load_full(run / "checkpoints" / f"step-{max(steps):08d}", "model.")
    moved = max(float((theirs[k] - start[k]).abs().max()) for k in theirs)
    assert worst < 0.05 * moved, (worst, moved)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=2e-4), key


def test_stage2_unet_lora_carries_stage1(tmp_path):
    """Stage 2 from stage 1's output: its exported LoRA merged into the BASE UNet gives stage 2's UNet."""
    from mumu_model import MUMUPipeline
    from mumu_model.lora import load_unet_lora, merge_unet_lora
    from mumu_model.training.trainer import load_base_pipeline

    shard = write_data(tmp_path / "data")
    lora = dict(unet="lora", unet_lr=1e-2, adapter_lr=1e-3, lora_rank=4, max_steps=2)
    stage1 = tiny(tmp_path / "one", shard, **lora)
    Trainer(stage1).train()
    stage2 = tiny(tmp_path / "two", shard, stage=2, init_from=str(tmp_path / "one" / "run"), lora_alpha=8, **lora)
    result = Trainer(stage2).train()

    _, modules, config = load_unet_lora(result.unet_lora_dir)
    assert {lora["A"].shape[0] for lora in modules.values()} == {8}  # two rank-4 stages
    base = load_base_pipeline(stage1).unet  # the UNet stage 1 started from
    merge_unet_lora(base, result.unet_lora_dir)
    trained = MUMUPipeline.from_pretrained(result.pipeline_dir).unet.state_dict()
    merged = base.state_dict()
    worst = max(float((merged[name] - trained[name]).abs().max()) for name in trained)
    print(f"base UNet + exported two-stage LoRA vs the stage-2 UNet: max abs difference {worst:.3g}")
    for name, value in trained.items():
        assert torch.allclose(merged[name], value, rtol=0, atol=1e-5), name
    # Stage 2's LoRA alone would not give it.
    alone = load_base_pipeline(stage1).unet
    assert any(not torch.equal(alone.state_dict()[n], v) for n, v in trained.items())


def test_a_truncated_shard_stops_the_run_naming_it_and_is_reported_when_allowed(tmp_path):
    from mumu_model.training.data import BadData

    data = tmp_path / "data"
    write_data(data)
    damaged = data / "00001.tar"
    write_shard(damaged, ((f"s{i:03d}", sample) for i, (_, sample) in enumerate(records(4))))
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(BadData, match=r"unreadable, more than max_bad_fraction=0\.01.*00001\.tar \(damaged"):
        Trainer(tiny(tmp_path, data, max_steps=1))

    config = tiny(tmp_path, data, max_steps=1, max_bad_fraction=1.0, tracking=True,
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = Trainer(config).train()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["data/unreadable_fraction"] > 0.1
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "data_report.json")).read_text())
    assert report["damaged_shards"] == 1 and report["worst_shards"][0]["shard"].endswith("00001.tar")
