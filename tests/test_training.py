"""The trainer on the tiny model, one process: modes and lrs (Table 1), learning, NaN handling,
exact resume after SIGKILL, checkpoint pruning, MLflow, and the final pipeline.

Everything runs at 32 px with 1 thread per process; the two-process FSDP2 run is in
test_training_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from mumu_model.data.shards import encode_image, json_bytes, write_shard
from mumu_model.training.checkpoint import CheckpointManager, load_full
from mumu_model.training.config import TrainConfig, load_train_config
from mumu_model.training.trainer import Trainer, TrainingDiverged

from .distributed import driver_files

REPO = Path(__file__).resolve().parents[1]
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]


def records(count: int):
    """Coloured circles on grey; the crop carries the colour, the caption only names the shape."""
    for index in range(count):
        colour = COLORS[index % len(COLORS)]
        image = Image.new("RGB", (48, 48), (120, 120, 120))
        ImageDraw.Draw(image).ellipse((12, 12, 36, 36), fill=colour)
        yield f"r{index:03d}", {
            "jpg": encode_image(image, "jpg"),
            "crop0.png": encode_image(Image.new("RGB", (16, 16), colour), "crop0.png"),
            "json": json_bytes({"prompt": "a <img:crop0.png> circle"}),
        }


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return write_shard(tmp_path_factory.mktemp("shards") / "00000.tar", records(8)).path


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory) -> Path:
    """Two records: with batch 2 every step sees the same batch (a fixed batch)."""
    return write_shard(tmp_path_factory.mktemp("small") / "00000.tar", records(2)).path


def tiny(tmp_path: Path, shard: Path, **fields) -> TrainConfig:
    values = dict(
        model_profile="tiny", image_size=28, shards=(str(shard),), resolution=32, batch_size=2,
        max_steps=4, warmup_steps=0, checkpoint_every=100, log_every=1, output_dir=str(tmp_path / "run"),
        tracking=False, export_unet_lora=True, export_dtype="float32", seed=0,
        data_workers=0,  # worker processes are tested in test_training_data.py
    )
    values.update(fields)
    return TrainConfig(**values)


FULL = dict(vision="full", connector="full", text="full", adapter="full", unet="full",
            vision_lr=1e-3, connector_lr=1e-3, text_lr=1e-3, adapter_lr=1e-3, unet_lr=1e-3)


def run_dir(output_dir) -> Path:
    """The one run folder a test's output folder holds."""
    (found,) = (Path(output_dir) / "runs").iterdir()
    return found


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


# -- config ------------------------------------------------------------------------------------


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"shards": ["a.tar"], "max_steps": 7, "tags": {"dvc": "abc"}}))
    config = load_train_config(path, ["unet=full", "validation_seeds=1,2", "resume=none", "shards=x.tar,y.tar",
                                      "tags.dagster_run_id=0123", "model_overrides.adapter_layers=3"])
    assert config.max_steps == 7 and config.unet == "full" and config.validation_seeds == (1, 2)
    assert config.shards == ("x.tar", "y.tar") and config.resume is None
    assert config.tags == {"dvc": "abc", "dagster_run_id": "0123"} and config.model_overrides == {"adapter_layers": 3}
    # Table 1 defaults.
    assert config.modes == {"vision": "frozen", "connector": "lora", "text": "lora", "adapter": "full", "unet": "full"}
    assert TrainConfig().lrs == {"vision": 3e-6, "connector": 3e-6, "text": 3e-6, "adapter": 1e-5, "unet": 5e-6}
    with pytest.raises(ValueError, match="unknown field 'max_step'"):
        load_train_config(path, ["max_step=3"])
    with pytest.raises(ValueError, match="unet must be one of"):
        load_train_config(path, ["unet=lorra"])
    with pytest.raises(ValueError, match="max_steps"):
        load_train_config(path, ["max_steps=abc"])
    for name in ("train_stage1_paper", "train_stage2_paper", "train_tiny"):
        load_train_config(REPO / "configs" / f"{name}.yaml")  # the examples stay valid


# -- ① ② Table 1 on the tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def table1(tmp_path_factory, shard):
    """The paper's modes and lrs (defaults) on the tiny model, 3 steps; snapshots before/after."""
    tmp = tmp_path_factory.mktemp("table1")
    trainer = Trainer(tiny(tmp, shard, max_steps=3))
    before = {"model": snapshot(trainer.model), "vae": snapshot(trainer.pipe.vae)}
    for _ in range(3):
        trainer.train_step(next(trainer.batches))
    after = {"model": snapshot(trainer.model), "vae": snapshot(trainer.pipe.vae)}
    return trainer, before, after


def test_frozen_parts_unchanged_bit_for_bit(table1):
    trainer, before, after = table1
    trainable = trainer.trainable
    frozen = [name for name in before["model"] if name not in trainable]
    assert any(name.startswith("encoder.vision_model.") for name in frozen)
    assert any(name.endswith("to_q.base_layer.weight") for name in frozen)  # the UNet under its LoRA
    for name in frozen:
        assert torch.equal(before["model"][name], after["model"][name]), name
    for name, value in before["vae"].items():
        assert torch.equal(value, after["vae"][name]), name
    assert not any(name.startswith("encoder.vision_model.") for name in trainable)
    changed = [name for name in trainable if not torch.equal(before["model"][name], after["model"][name])]
    assert any(name.startswith("adapter.") for name in changed)
    assert any("lora_B" in name and name.startswith("unet.") for name in changed)


def test_lora_where_configured_and_param_groups_per_module(table1):
    trainer, _, _ = table1
    names = list(trainer.model.state_dict())
    for prefix in ("encoder.connector.", "encoder.text_model.", "unet."):
        assert any(n.startswith(prefix) and "lora_A" in n for n in names), prefix
    for prefix in ("encoder.vision_model.", "adapter."):
        assert not any(n.startswith(prefix) and "lora_" in n for n in names), prefix
    # Only LoRA matrices train in the LoRA'd parts; the adapter trains fully.
    for name in trainer.trainable:
        if not name.startswith("adapter."):
            assert "lora_" in name, name
    assert any(n.startswith("adapter.proj_in") for n in trainer.trainable)
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert list(groups) == ["connector", "text", "adapter", "unet"]
    assert {name: group["initial_lr"] for name, group in groups.items()} == {
        "connector": 3e-6, "text": 3e-6, "adapter": 1e-5, "unet": 5e-6,
    }
    assert sum(len(g["params"]) for g in groups.values()) == len(trainer.trainable)


# -- ③ learning -------------------------------------------------------------------------------------


def test_loss_finite_and_decreasing_on_a_fixed_batch(tmp_path, small_shard):
    config = tiny(tmp_path, small_shard, max_steps=30, conditioning_dropout=0.0, augment_probability=0.0, **FULL)
    trainer = Trainer(config)
    batch = next(trainer.batches)  # the only two records: every step trains on this batch

    def fixed_loss() -> float:  # the same noise and timesteps each time
        with torch.no_grad():
            return float(trainer.compute_loss(batch, torch.Generator().manual_seed(123)))

    start = fixed_loss()
    losses = [trainer.train_step(next(trainer.batches))["loss"] for _ in range(30)]
    end = fixed_loss()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert end < 0.7 * start, (start, end)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_schedulers_prediction_type(tmp_path, small_shard, prediction_type):
    trainer = Trainer(tiny(tmp_path, small_shard, model_overrides={"prediction_type": prediction_type}))
    assert trainer.noise_scheduler.config.prediction_type == prediction_type
    batch = next(trainer.batches)
    trainer.model.forward = lambda inputs, noisy, timesteps, time_ids: torch.zeros_like(noisy)
    loss = trainer.compute_loss(batch, torch.Generator().manual_seed(5))  # MSE of 0 vs the target

    latents = trainer.latents(batch)
    generator = torch.Generator().manual_seed(5)  # the same draws, in the same order
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    velocity = trainer.noise_scheduler.get_velocity(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else velocity
    assert float(loss) == pytest.approx(float(target.pow(2).mean()), rel=1e-5)
    assert float((velocity - noise).abs().max()) > 0.1  # the two targets are told apart


# -- ④ NaN ----------------------------------------------------------------------------------------


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, shard):
    trainer = Trainer(tiny(tmp_path, shard, max_steps=6, checkpoint_every=2))
    compute = trainer.compute_loss

    def poisoned(batch, generator):
        loss = compute(batch, generator)
        return loss * float("nan") if trainer.step == 3 else loss  # step 4 goes bad

    trainer.compute_loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*last good checkpoint is .*step-00000002"):
        trainer.train()
    manager = CheckpointManager(trainer.run_dir)
    assert [step for step, _ in manager.complete()] == [2]
    assert not (tmp_path / "run" / "pipeline").exists()
    assert not [p for p in manager.root.iterdir() if p.name.startswith(".")]  # no half-written folder


# -- ⑤ exact resume after SIGKILL -----------------------------------------------------------------------


def test_resume_after_sigkill_gives_the_same_weights(tmp_path, shard):
    fields = dict(max_steps=8, checkpoint_every=2, conditioning_dropout=0.5, augment_probability=0.5)
    reference = Trainer(tiny(tmp_path / "ref", shard, **fields)).train()

    killed = tiny(tmp_path / "killed", shard, **fields)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(killed.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "mumu_model.training", str(config_file)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = Path(killed.output_dir) / "runs"
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/checkpoints/step-00000002")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stderr = process.stderr.read().decode()
    assert list(runs.glob("*/checkpoints/step-00000002")), stderr[-2000:]
    assert not (Path(killed.output_dir) / "pipeline").exists(), "the run finished before it was killed"
    steps_at_kill = [step for step, _ in CheckpointManager(run_dir(killed.output_dir)).complete()]
    assert max(steps_at_kill) < 8

    from mumu_model.cli import main

    assert main(["train", str(config_file), "--resume", "latest"]) == 0
    # The same run (same identity) continued: one run folder, which the reference's id names too.
    assert run_dir(killed.output_dir).name == reference.run_id
    ours = load_full(run_dir(killed.output_dir) / "checkpoints" / "step-00000008", "model.")
    theirs = load_full(reference.checkpoint, "model.")
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    print(f"resume after SIGKILL at step {max(steps_at_kill)}: max abs weight difference {worst:.3g}")
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6), key


SIGTERM_DRIVER = """
import os, signal, sys
from mumu_model.cli import main
from mumu_model.training.trainer import Trainer

original, stop_in = Trainer.train_step, int(sys.argv[2])


def train_step(self, batches):
    if self.step + 1 == stop_in:  # a preemption notice arrives while this step runs
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, batches)


Trainer.train_step = train_step
if __name__ == "__main__":
    sys.exit(main(["train", sys.argv[1]]))
"""


def test_sigterm_finishes_the_step_checkpoints_and_exits_for_a_requeue(tmp_path, shard):
    import random

    from mumu_model.training.trainer import REQUEUE_EXIT_CODE

    fields = dict(max_steps=6, checkpoint_every=100, conditioning_dropout=0.5, augment_probability=0.5,
                  resume="latest")
    reference = Trainer(tiny(tmp_path / "ref", shard, **fields)).train()

    preempted = tiny(tmp_path / "preempted", shard, **fields)
    config_file, driver = driver_files(tmp_path, preempted, SIGTERM_DRIVER, "preempted")
    step = random.Random(os.getpid()).randint(1, 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(driver), str(config_file), str(step)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == REQUEUE_EXIT_CODE, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mumu: preempted: SIGTERM: stopped after step {step} of 6 and wrote "), last
    assert last.endswith(f"run the same command again to continue run {reference.run_id}"), last
    assert [s for s, _ in CheckpointManager(run_dir(preempted.output_dir)).complete()] == [step]
    assert not (Path(preempted.output_dir) / "pipeline").exists()

    from mumu_model.cli import main

    assert main(["train", str(config_file)]) == 0  # the requeued job: the same command
    ours = load_full(run_dir(preempted.output_dir) / "checkpoints" / "step-00000006", "model.")
    theirs = load_full(reference.checkpoint, "model.")
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-6), key


# -- ⑦ pruning ----------------------------------------------------------------------------------------


def test_checkpoints_total_limit_keeps_the_newest(tmp_path, shard):
    config = tiny(tmp_path, shard, max_steps=5, checkpoint_every=1, checkpoints_total_limit=2, cache_latents=True)
    trainer = Trainer(config)
    for _ in range(5):
        trainer.train_step(next(trainer.batches))
        trainer.save_checkpoint()
    manager = CheckpointManager(trainer.run_dir)
    assert [step for step, _ in manager.complete()] == [4, 5]
    # 10 samples over 8 records: the cache computed each record's latents once.
    assert trainer.latent_cache.misses == 8 and trainer.latent_cache.hits == 2
    assert manager.latest().name == "step-00000005"
    # resume="latest" continues from it.
    resumed = Trainer(tiny(tmp_path, shard, max_steps=5, resume="latest"))
    assert resumed.step == 5


# -- ⑧ ⑨ MLflow and the final pipeline (one run through the CLI) ----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shard):
    tmp = tmp_path_factory.mktemp("tracked")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(tmp / "green.png")
    config = tiny(
        tmp, shard, max_steps=3, validate_every=2, validation_prompts=("a <img:green.png> circle",),
        validation_image_root=str(tmp), validation_seeds=(0, 1), validation_steps=2,
        tracking=True, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment="test", run_name="tiny",
        tags={"dagster_run_id": "run-123", "data_dvc_hash": "abc123"},
    )
    config_file = tmp / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    from mumu_model.cli import main

    assert main(["train", str(config_file)]) == 0
    return config


def test_mlflow_run_has_params_metrics_images_and_deliverables(finished_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=finished_run.tracking_uri)
    experiment = client.get_experiment_by_name("test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["unet"] == "lora" and run.data.params["adapter_lr"] == "1e-05"
    assert run.data.params["tags.dagster_run_id"] == "run-123"
    assert run.data.tags["data_dvc_hash"] == "abc123" and run.data.tags["dagster_run_id"] == "run-123"
    for metric in ("loss", "grad_norm", "lr/adapter", "lr/unet", "samples_per_s", "peak_memory_mb"):
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert {"validation/step-00000002.png", "validation/step-00000003.png"} <= artifacts
    grid = Image.open(client.download_artifacts(run.info.run_id, "validation/step-00000003.png"))
    assert grid.width >= 4 * 32  # a crop, a gap and two seeds
    # The LoRA, the adapter and the config by default; the whole pipeline only on request.
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"unet_lora", "adapter", "train_config.yaml"} <= top and "pipeline" not in top, top
    assert "adapter/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert run.data.tags["mumu.run_id"] == run_dir(finished_run.output_dir).name


def test_final_pipeline_loads_and_generates(finished_run):
    from mumu_model import MUMUPipeline
    from mumu_model.lora import load_unet_lora

    out = Path(finished_run.output_dir)
    pipe = MUMUPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    names = [n for n, _ in pipe.unet.named_parameters()] + [n for n, _ in pipe.encoder.named_parameters()]
    assert not any("lora" in n for n in names)  # merged: a plain MUMUPipeline
    image = pipe("a <img:green.png> circle", image_root=out.parent, height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    _, modules, lora_config = load_unet_lora(out / "unet_lora")
    assert modules and lora_config["r"] == 8
    # The merged UNet equals the checkpoint's base + LoRA: the exported LoRA is the trained one.
    state = json.loads((run_dir(out) / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["unet"] == "lora"



def test_stage2_starts_from_a_stage1_checkpoint(tmp_path, shard, finished_run):
    from mumu_model import MUMUPipeline
    from mumu_model.training.trainer import load_init_pipeline

    out = Path(finished_run.output_dir)
    stage1 = MUMUPipeline.from_pretrained(out / "pipeline")
    config = tiny(tmp_path, shard, stage=2, init_from=str(run_dir(out) / "checkpoints" / "step-00000003"),
                  image_size=56, max_images=1, max_steps=1)
    trainer = Trainer(config)
    assert trainer.pipe.image_size == 56 and trainer.pipe.tokens_per_image == 16  # 1,296 at paper size
    # Stage 1's LoRA is merged into the weights stage 2 starts from; stage 2 adds fresh LoRAs.
    unet = {k.replace(".base_layer", ""): v for k, v in trainer.model.unet.state_dict().items() if "lora_" not in k}
    assert unet.keys() == stage1.unet.state_dict().keys()
    for name, value in stage1.unet.state_dict().items():
        assert torch.equal(unet[name], value), name
    for name, value in stage1.adapter.state_dict().items():
        assert torch.equal(trainer.model.adapter.state_dict()[name], value), name
    assert trainer.train_step(next(trainer.batches))["loss"] > 0
    # A training output folder works too (its pipeline/).
    assert isinstance(load_init_pipeline(out), MUMUPipeline)


# -- Dagster Pipes ------------------------------------------------------------------------------------


def test_reports_through_dagster_pipes_when_dagster_launches_it(tmp_path, shard):
    """A Dagster asset runs `python -m mumu_model.training` with PipesSubprocessClient."""
    import dagster as dg

    config = tiny(tmp_path, shard, max_steps=2, tracking=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                  log_pipeline_artifact=False)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))

    @dg.asset(required_resource_keys={"pipes"})
    def trained_model(context):  # no annotations: this module's are strings (__future__)
        command = [sys.executable, "-m", "mumu_model.training", str(config_file)]
        run = context.resources.pipes.run(command=command, context=context, env={"OMP_NUM_THREADS": "1"})
        return run.get_materialize_result()

    result = dg.materialize([trained_model], resources={"pipes": dg.PipesSubprocessClient(cwd=str(REPO))},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    (materialization,) = result.asset_materializations_for_node("trained_model")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["steps"] == 2 and metadata["final_loss"] > 0
    assert metadata["pipeline_path"] == str(run_dir(tmp_path / "run") / "pipeline")
    assert (tmp_path / "run" / "pipeline").resolve() == Path(metadata["pipeline_path"]).resolve()
    assert metadata["new_run"] is True and metadata["run_id"] == run_dir(tmp_path / "run").name

    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=config.tracking_uri).get_run(metadata["mlflow_run_id"])
    assert run.data.tags["dagster_run_id"] == result.run_id


def test_no_pipes_outside_dagster(monkeypatch):
    from mumu_model.tracking import _open_pipes

    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    assert _open_pipes() is None
