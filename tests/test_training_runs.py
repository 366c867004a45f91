"""A training run's identity: new data or a new recipe starts a new run, the same run resumes;
bad starting points and data that changes under a run fail clearly; ranks never wait on rank 0's
export; a checkpoint written by two processes resumes on one.

Tiny model, 32 px, one thread per process (see test_training.py).
"""

from __future__ import annotations

import contextlib
import re
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

from .distributed import driver_files, run_two, torchrun_two
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
    config_file, driver = driver_files(tmp_path, config, SLOW_EXPORT)
    code, output = run_two(driver, config_file, "16", timeout=280)
    assert code == 0, output[-5000:]
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


SLOW_HASH = '''
import sys, time
from mumu_model.training import trainer as module
from mumu_model.training.config import load_train_config

data_version = module.data_version


def slow_data_version(*args, **kwargs):  # rank 0 hashes terabytes: longer than the process group's timeout
    time.sleep(float(sys.argv[2]))
    return data_version(*args, **kwargs)


module.data_version = slow_data_version
if __name__ == "__main__":
    module.train(load_train_config(sys.argv[1]))
'''


def test_other_ranks_wait_for_rank_0s_data_hash_past_the_timeout(tmp_path):
    shard = write_data(tmp_path / "data")
    config = tiny(tmp_path, shard, max_steps=1, dist_timeout_s=8, **FULL)  # no data_version: rank 0 hashes
    config_file, driver = driver_files(tmp_path, config, SLOW_HASH)
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
    run_config = "import sys\nfrom mumu_model.training.trainer import run\nrun(sys.argv[1], [])\n"
    config_file, driver = driver_files(tmp_path, killed, run_config, "killed")
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
    assert resumed.run_message.endswith("changed without starting a new run: processes 2 -> 1"), resumed.run_message
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


@pytest.mark.parametrize("start", ["output folder", "checkpoint"])
def test_stage2_unet_lora_carries_stage1(tmp_path, start):
    """Stage 2 from stage 1's output or from its last checkpoint folder (the paper config's
    `init_from: runs/stage1/checkpoints/step-N`): its exported LoRA merged into the BASE UNet
    gives stage 2's UNet."""
    from mumu_model import MUMUPipeline
    from mumu_model.lora import load_unet_lora, merge_unet_lora
    from mumu_model.training.trainer import load_base_pipeline

    shard = write_data(tmp_path / "data")
    lora = dict(unet="lora", unet_lr=1e-2, adapter_lr=1e-3, lora_rank=4, max_steps=2)
    stage1 = tiny(tmp_path / "one", shard, **lora)
    first = Trainer(stage1).train()
    init_from = tmp_path / "one" / "run" if start == "output folder" else first.checkpoint
    stage2 = tiny(tmp_path / "two", shard, stage=2, init_from=str(init_from), lora_alpha=8, **lora)
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
    damage(data)
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


def damage(data: Path) -> Path:
    """A second shard in `data`, cut in half: a third of the data is lost."""
    damaged = data / "00001.tar"
    write_shard(damaged, ((f"s{i:03d}", sample) for i, (_, sample) in enumerate(records(4))))
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    return damaged


@pytest.mark.parametrize("refusal", ["bad data", "another run's checkpoint", "incomplete init_from"])
def test_refusals_end_in_one_line_and_status_2(tmp_path, capsys, refusal):
    from mumu_model.cli import main

    data = tmp_path / "data"
    write_data(data)
    overrides = {}
    if refusal == "bad data":
        damage(data)
        expected = r"unreadable, more than max_bad_fraction=0\.01.*00001\.tar \(damaged"
    elif refusal == "another run's checkpoint":
        first = Trainer(tiny(tmp_path / "first", data, max_steps=1)).train()
        overrides = {"resume": str(first.checkpoint), "unet_lr": 1e-3}
        expected = r"belongs to another run.*unet_lr 5e-06 -> 0\.001"
    else:
        broken = tmp_path / "broken"
        (broken / "unet").mkdir(parents=True)
        (broken / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
        (broken / "unet" / "config.json").write_text("{}")
        overrides = {"init_from": str(broken)}
        expected = r"init_from=.*broken.*incomplete: no \*\.safetensors weights"
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump({**tiny(tmp_path, data, max_steps=1).to_dict(), **overrides}))
    capsys.readouterr()
    assert main(["train", str(config_file)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"mumu: error: .*" + expected, last), last


def test_the_latent_cache_encodes_new_pixels_behind_an_old_key(tmp_path):
    """Re-rendered data keeps its record keys (synthetic keys come from content and style): the
    cache is keyed by the target's pixels too, so the new run trains on the new images' latents."""
    data = tmp_path / "data"
    write_data(data)
    fields = dict(max_steps=2, checkpoint_every=2, cache_latents=True, resume="latest", **FULL)
    first = Trainer(tiny(tmp_path, data, **fields))
    first.train()
    assert first.latent_cache.misses == 4 and first.latent_cache.hits == 0

    write_data(data, offset=1)  # the same keys r000..r003, other pixels
    second = Trainer(tiny(tmp_path, data, **fields))
    batch = next(second.batches)
    latents = second.latents(batch)
    assert second.latent_cache.misses == 2 and second.latent_cache.hits == 0
    from mumu_model.training.data import vae_latents

    assert torch.equal(latents, vae_latents(second.pipe.vae, batch["pixel_values"]))
    # The same pixels again (a restart of this run) are hits.
    second.latent_cache.flush()
    again = Trainer(tiny(tmp_path, data, **fields))
    again.latents(next(again.batches))
    assert again.latent_cache.hits == 2 and again.latent_cache.misses == 0


def test_bad_data_counts_and_their_limit_hold_across_a_resume(tmp_path):
    """What earlier steps found unusable is in the checkpoint: a resumed run's figures and its
    max_bad_fraction check cover the whole run, not the steps since the last restart."""
    from mumu_model.data.shards import json_bytes
    from mumu_model.training.data import BadData

    good = list(records(8))
    bad = [(f"x{i}", {"jpg": b"garbage", "json": json_bytes({"prompt": "a circle"})}) for i in range(2)]
    shard = write_shard(tmp_path / "data" / "00000.tar", good + bad).path
    fields = dict(max_steps=5, checkpoint_every=5, resume="latest", max_bad_fraction=1.0)
    first = Trainer(tiny(tmp_path, shard, **fields))
    first.train()  # 10 usable samples: the whole epoch was read, both bad samples found
    report = first.stream.data_report()
    assert report["unusable_samples"] == 2 and report["unreadable_fraction"] == pytest.approx(0.2)

    resumed = Trainer(tiny(tmp_path, shard, **fields))
    assert resumed.step == 5 and resumed.stream.data_report() == report
    with pytest.raises(BadData, match=r"20\.00% of the training data is unreadable, more than max_bad_fraction=0\.1"):
        Trainer(tiny(tmp_path, shard, **{**fields, "max_bad_fraction": 0.1}))


# -- what resumes, what starts a new run ------------------------------------------------------------


def test_extending_max_steps_resumes_the_run_and_says_how_the_schedule_goes_on(tmp_path):
    from mumu_model.training.trainer import lr_factor

    shard = write_data(tmp_path / "data")
    fields = dict(resume="latest", lr_schedule="cosine", warmup_steps=0, min_lr_ratio=0.1, **FULL)
    first = Trainer(tiny(tmp_path, shard, max_steps=2, **fields)).train()
    longer = tiny(tmp_path, shard, max_steps=4, **fields)
    extended = Trainer(longer)
    assert extended.run_id == first.run_id and not extended.new_run and extended.step == 2
    assert "changed without starting a new run: max_steps 2 -> 4" in extended.run_message
    expected = f"lr factor at step 2 {lr_factor(tiny(tmp_path, shard, max_steps=2, **fields), 2):.3g} -> 0.55"
    assert f"the cosine schedule now decays to min_lr_ratio at step 4: {expected}" in extended.run_message
    # The next step's lr follows the longer schedule (a finished cosine run sits at min_lr_ratio).
    assert [g["lr"] for g in extended.optimizer.param_groups] == pytest.approx(
        [longer.lrs[g["name"]] * lr_factor(longer, 2) for g in extended.optimizer.param_groups])
    assert extended.train().step == 4


def test_memory_settings_resume_the_run_and_say_what_changed(tmp_path):
    shard = write_data(tmp_path / "data")
    first = Trainer(tiny(tmp_path, shard, max_steps=1, resume="latest")).train()
    # After an out-of-memory error: activation checkpointing on, bf16 (fp32 on a CPU anyway).
    resumed = Trainer(tiny(tmp_path, shard, max_steps=1, resume="latest", activation_checkpointing=True,
                           mixed_precision="bf16"))
    assert resumed.run_id == first.run_id and resumed.step == 1 and not resumed.new_run
    assert resumed.run_message.endswith("changed without starting a new run: activation_checkpointing False -> True; "
                                        "mixed_precision 'no' -> 'bf16'"), resumed.run_message


def test_the_process_count_is_part_of_the_run_only_without_global_batch_size(tmp_path):
    from mumu_model.training.identity import identity_differences, run_id, run_identity

    config = tiny(tmp_path, "x.tar")
    two, four = run_identity(config, 1, "data", None), run_identity(config, 2, "data", None)
    assert run_id(two) != run_id(four)
    assert identity_differences(two, four) == [
        "global batch (global_batch_size, else batch_size x processes) 2 -> 4"]
    fixed = tiny(tmp_path, "x.tar", global_batch_size=4)
    assert run_id(run_identity(fixed, 1, "data", None)) == run_id(run_identity(fixed, 2, "data", None))
    # Both paper configs fix it, so a restart on another number of GPUs continues the run.
    from mumu_model.training.config import load_train_config

    for name in ("train_stage1_paper", "train_stage2_paper"):
        assert load_train_config(REPO / "configs" / f"{name}.yaml").global_batch_size, name


SIGTERM_ONE_RANK = """
import os, signal, sys
from mumu_model.cli import main
from mumu_model.training.trainer import Trainer

original, stop_in = Trainer.train_step, int(sys.argv[2])


def train_step(self, batches):
    if self.step + 1 == stop_in and self.dist.rank == 1:  # only one node gets the notice
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, batches)


Trainer.train_step = train_step
if __name__ == "__main__":
    sys.exit(main(["train", sys.argv[1]]))
"""


def test_sigterm_on_one_rank_stops_every_rank_after_the_step_with_a_checkpoint(tmp_path):
    """Under torchrun, the rank that got SIGTERM tells the others at the end of the step; every rank
    writes its shards of that step's checkpoint and exits for a requeue; the run resumes (here on
    one process) and ends where an uninterrupted run does."""
    import random

    shard = write_data(tmp_path / "data", count=8)
    fields = dict(max_steps=5, checkpoint_every=100, batch_size=2, global_batch_size=4, resume="latest", **FULL)
    reference = Trainer(tiny(tmp_path / "ref", shard, **fields)).train()

    preempted = tiny(tmp_path / "preempted", shard, **fields)
    config_file, driver = driver_files(tmp_path, preempted, SIGTERM_ONE_RANK, "preempted")
    step = random.Random(os.getpid()).randint(1, 4)
    code, output = run_two(driver, config_file, str(step), timeout=280)
    assert code != 0 and output.count("mumu: preempted: SIGTERM: stopped after step") == 2, output[-4000:]
    (run,) = (Path(preempted.output_dir) / "runs").iterdir()
    assert [s for s, _ in CheckpointManager(run).complete()] == [step], output[-4000:]

    result = Trainer(preempted).train()
    ours, theirs = load_full(result.checkpoint, "model."), load_full(reference.checkpoint, "model.")
    for key in ours:  # summation order differs between 2 ranks and 2 micro-batches (see above)
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=2e-4), key


def test_skip_fit_check_trains_without_the_memory_check(monkeypatch):
    from mumu_model.cli import main
    from mumu_model.training import trainer
    from mumu_model.training.config import load_train_config

    seen = []

    def run(path, overrides, resume=None):
        seen.append(load_train_config(path, overrides))
        return trainer.TrainResult(step=0, loss=None)

    monkeypatch.setattr(trainer, "run", run)
    config = REPO / "configs" / "train_tiny.yaml"
    assert main(["train", str(config)]) == 0 and main(["train", str(config), "--skip-fit-check"]) == 0
    assert [c.check_fit for c in seen] == [True, False]
    # Not part of the run's identity: skipping the check trains the same run.
    from mumu_model.training.identity import run_identity

    assert run_identity(seen[0], 1, "d", None) == run_identity(seen[1], 1, "d", None)
