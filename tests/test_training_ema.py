"""EMA of the trained weights (`ema_decay`): the math with warm-up, where it is used (validation,
the exported pipeline and UNet LoRA), that it leaves frozen and raw weights alone, exact resume,
config validation, and save/load with FSDP2 DTensors (two gloo processes).

Tiny model at 32 px as in test_training.py; one trained run (module fixture) serves most tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mumu_model.training.checkpoint import load_full, load_weights
from mumu_model.training.config import TrainConfig, load_train_config
from mumu_model.training.ema import EMA
from mumu_model.training.trainer import Trainer

from .test_training import shard, tiny  # noqa: F401  (shard is a fixture)

REPO = Path(__file__).resolve().parents[1]
DECAY = 0.9  # small enough that 3 steps move the EMA visibly; warm-up decides the first steps


def warmup_decay(decay: float, step: int) -> float:
    return min(decay, (1 + step) / (10 + step))  # diffusers' EMAModel, step 0-based


def reference_ema(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """EMA by hand in float64: snapshots[0] is the start, snapshots[t + 1] the weights after step t."""
    ema = {name: value.double() for name, value in snapshots[0].items()}
    for step, weights in enumerate(snapshots[1:]):
        d = warmup_decay(decay, step)
        ema = {name: d * ema[name] + (1 - d) * weights[name].double() for name in ema}
    return ema


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name].double(), theirs[name].double(), rtol=0, atol=atol), name


# -- config ------------------------------------------------------------------------------------------


def test_ema_decay_must_be_in_0_1():
    assert TrainConfig().ema_decay == 0.0  # off by default
    assert TrainConfig(ema_decay=0.999).ema_decay == 0.999
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
            TrainConfig(ema_decay=bad)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        load_train_config(None, ["ema_decay=1"])
    assert load_train_config(None, ["ema_decay=0.9999"]).ema_decay == 0.9999


# -- the EMA class on plain tensors --------------------------------------------------------------------


def test_ema_math_with_warmup_swap_and_state_dict():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    named = list(layer.named_parameters())
    ema = EMA(named, decay=0.5)
    snapshots = [{n: p.detach().clone() for n, p in named}]
    decays = []
    for step in range(12):  # warm-up reaches the cap 0.5 at step 8: (1 + 8) / (10 + 8)
        with torch.no_grad():
            for _, param in named:
                param.add_(torch.randn_like(param))
        snapshots.append({n: p.detach().clone() for n, p in named})
        decays.append(ema.update(step))
    assert decays[:3] == [0.1, 2 / 11, 3 / 12] and decays[8:] == [0.5] * 4
    assert_close(ema.state_dict(), reference_ema(snapshots, 0.5))

    raw = {n: p.detach().clone() for n, p in named}
    with ema.swapped_in():
        assert_close({n: p.detach() for n, p in named}, ema.state_dict(), atol=0)
    for name, param in named:  # the raw weights come back bit for bit
        assert torch.equal(param, raw[name]), name
    with pytest.raises(RuntimeError), ema.swapped_in():
        raise RuntimeError("generation failed")
    for name, param in named:  # ...also when the block raises
        assert torch.equal(param, raw[name]), name

    other = EMA(named, decay=0.5)  # shadows start as the raw weights
    other.load_state_dict(ema.state_dict())
    assert_close(other.state_dict(), ema.state_dict(), atol=0)
    with pytest.raises(ValueError, match="missing.*unexpected"):
        other.load_state_dict({"weight": raw["weight"], "extra": raw["bias"]})
    with pytest.raises(ValueError, match="EMA decay"):
        EMA(named, decay=0.0)


# -- one trained run with EMA ---------------------------------------------------------------------------


# The paper's modes (connector/text/UNet LoRA, adapter full, ViT frozen) at lr 1e-3, so that 3
# steps move the weights far enough for EMA and raw weights to differ clearly after merging.
FIELDS = dict(ema_decay=DECAY, max_steps=3, checkpoint_every=2, connector_lr=1e-3, text_lr=1e-3,
              adapter_lr=1e-3, unet_lr=1e-3)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, shard):  # noqa: F811
    """3 steps with EMA 0.9 and validation at steps 2 and 3; raw trainable weights after every step."""
    tmp = tmp_path_factory.mktemp("ema")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(tmp / "green.png")
    config = tiny(tmp, shard, validate_every=2, validation_prompts=("a <img:green.png> circle",),
                  validation_image_root=str(tmp), validation_steps=1, **FIELDS)
    trainer = Trainer(config)
    model = trainer.model  # finish() drops the trainer's references; the module lives on here
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def everything() -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in model.state_dict().items()}

    before = everything()
    snapshots = [{n: p.detach().clone() for n, p in trainable.items()}]
    decays = []

    train_step = trainer.train_step

    def recording_step(batch):
        metrics = train_step(batch)
        snapshots.append({n: p.detach().clone() for n, p in trainable.items()})
        decays.append(metrics["ema_decay"])
        return metrics

    # What the validation forward sees: one fully trained adapter weight (grad off = generating).
    probe_name = "adapter.proj_in.weight"
    seen = []

    def record_generation_weights(module, args):
        if not torch.is_grad_enabled():
            seen.append((trainer.step, trainable[probe_name].detach().clone()))

    model.adapter.register_forward_pre_hook(record_generation_weights)
    trainer.train_step = recording_step
    result = trainer.train()
    return dict(trainer=trainer, config=config, result=result, model=model, before=before, after=everything(),
                snapshots=snapshots, decays=decays, seen=seen, probe=probe_name)


def test_ema_follows_the_hand_computed_average(ema_run):
    assert ema_run["decays"] == [warmup_decay(DECAY, t) for t in range(3)] == [0.1, 2 / 11, 0.25]
    reference = reference_ema(ema_run["snapshots"], DECAY)
    checkpoint = ema_run["result"].checkpoint
    ema = load_full(checkpoint, "ema.")
    assert set(ema) == ema_run["trainer"].trainable  # exactly the trainable tensors: LoRA + adapter
    assert all("lora_" in n or n.startswith("adapter.") for n in ema)
    assert_close(ema, reference)
    # model.* keeps the raw last-step weights, which differ from the EMA.
    raw = load_full(checkpoint, "model.")
    assert_close(raw, ema_run["snapshots"][-1], atol=0)
    assert max(float((raw[n] - ema[n]).abs().max()) for n in ema) > 1e-4
    # Step 2's checkpoint has step 2's EMA.
    assert_close(load_full(checkpoint.parent / "step-00000002", "ema."),
                 reference_ema(ema_run["snapshots"][:3], DECAY))


def test_validation_uses_ema_then_raw_weights_come_back_and_frozen_stay(ema_run):
    probe, snapshots = ema_run["probe"], ema_run["snapshots"]
    generated = {step: weight for step, weight in ema_run["seen"]}
    assert sorted(generated) == [2, 3]  # validate_every=2 and the final validation
    for step, weight in generated.items():
        expected = reference_ema(snapshots[: step + 1], DECAY)[probe]
        assert torch.allclose(weight.double(), expected, rtol=0, atol=1e-6), step
        assert not torch.allclose(weight, snapshots[step][probe], rtol=0, atol=1e-5), step
    before, after, trainable = ema_run["before"], ema_run["after"], ema_run["trainer"].trainable
    for name in before:
        if name in trainable:  # the raw weights, not the EMA, are what stays in the model
            assert torch.equal(after[name], snapshots[-1][name]), name
        else:
            assert torch.equal(after[name], before[name]), name


def test_exported_pipeline_and_unet_lora_are_the_ema_weights(ema_run):
    from mumu_model import MUMUPipeline
    from mumu_model.lora import load_unet_lora

    out = Path(ema_run["config"].output_dir)
    checkpoint = ema_run["result"].checkpoint
    ema, raw = load_full(checkpoint, "ema."), load_full(checkpoint, "model.")
    pipe = MUMUPipeline.from_pretrained(out / "pipeline")
    exported = {f"{part}.{n}": t for part in ("encoder", "adapter", "unet")
                for n, t in getattr(pipe, part).state_dict().items()}
    before = ema_run["before"]

    # Fully trained adapter: the EMA itself.
    adapter = [n for n in ema if n.startswith("adapter.")]
    assert adapter and all(torch.equal(exported[n], ema[n]) for n in adapter)
    # LoRA'd layers (connector, text, UNet): frozen base + B @ A (scale 1) with the EMA matrices.
    merged = 0
    for name_a in (n for n in ema if n.endswith(".lora_A.default.weight")):
        layer = name_a.removesuffix(".lora_A.default.weight")
        expected = before[f"{layer}.base_layer.weight"] + ema[f"{layer}.lora_B.default.weight"] @ ema[name_a]
        assert torch.allclose(exported[f"{layer}.weight"], expected, rtol=0, atol=1e-6), layer
        merged += 1
    assert merged and any(n.startswith("unet.") for n in ema if n.endswith("lora_A.default.weight"))
    worst_raw = max(float((exported[n] - raw[n]).abs().max()) for n in adapter)
    assert worst_raw > 1e-4  # the raw last-step weights would have given another pipeline

    # The UNet LoRA export holds the EMA matrices.
    _, modules, _ = load_unet_lora(out / "unet_lora")
    assert modules
    for module, lora in modules.items():
        assert torch.equal(lora["A"], ema[f"unet.{module}.lora_A.default.weight"]), module
        assert torch.equal(lora["B"], ema[f"unet.{module}.lora_B.default.weight"]), module
    # The raw weights stay reachable (e.g. to compare): trained_model_from_checkpoint(ema=False).
    weights, _ = load_weights(checkpoint, ema=False)
    assert_close(weights, raw, atol=0)


def test_resume_restores_the_ema_exactly(ema_run, tmp_path, shard):  # noqa: F811
    """Continue from the uninterrupted run's step-2 checkpoint into another folder: same step 3."""
    reference = ema_run["result"].checkpoint
    config = tiny(tmp_path, shard, resume=str(reference.parent / "step-00000002"), export_unet_lora=False,
                  log_pipeline_artifact=False, **FIELDS)
    trainer = Trainer(config)
    assert trainer.step == 2
    assert_close(trainer.ema.state_dict(), load_full(reference.parent / "step-00000002", "ema."), atol=0)
    result = trainer.train()
    ours, theirs = result.checkpoint, reference
    for file in ("ema.", "model."):
        a, b = load_full(ours, file), load_full(theirs, file)
        worst = max(float((a[n] - b[n]).abs().max()) for n in a)
        print(f"resumed {file}: max abs difference {worst:.3g}")
        assert_close(a, b, atol=1e-6)


# -- FSDP2: two gloo processes --------------------------------------------------------------------------

DRIVER = '''
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mumu_model.training.ema import EMA

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same full weights on both ranks
# Odd first dimensions: FSDP2 shards unevenly (rank 1 holds fewer rows, or none for the 1-row bias).
model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 1))
fully_shard(model[0]); fully_shard(model[1]); fully_shard(model)
named = list(model.named_parameters())
ema = EMA(named, decay=0.5)
for step in range(3):
    with torch.no_grad():
        for _, p in named:
            p.add_(1.0 + step)  # the same change on every shard: the reference is simple
    ema.update(step)
full = ema.state_dict()  # collective
raw = {n: p.full_tensor() for n, p in named}
with ema.swapped_in():
    inside = {n: p.full_tensor() for n, p in named}
    out = model(torch.ones(2, 4))  # forward all-gathers the EMA weights
restored = {n: p.full_tensor() for n, p in named}
fresh = EMA(named, decay=0.5)
fresh.load_state_dict(full)
report = {
    "dtensor": all(isinstance(s, DTensor) and s.placements == p.placements for s, (_, p) in zip(ema.shadows, named)),
    "local_rows": [s.to_local().shape[0] for s in ema.shadows],
    "loaded_equal": all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), full.values())),
    "swapped_equal": all(torch.equal(inside[n], full[n]) for n in full),
    "restored_equal": all(torch.equal(restored[n], raw[n]) for n in raw),
    "ema_minus_raw": {n: (full[n] - raw[n]).flatten().tolist() for n in full},
    "forward_finite": bool(torch.isfinite(out).all()),
}
(__import__("pathlib").Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
'''


def test_ema_save_and_load_with_fsdp2_dtensors(tmp_path):
    # The two ranks are started directly with torchrun's environment variables: without torchrun's
    # own process (another torch import) this takes about half the time on a busy 2-core machine.
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(driver), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    for process, output in zip(ranks, outputs):
        assert process.returncode == 0, output[-5000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Hand reference: every weight moved by +1, +2, +3, so raw - EMA is the same number everywhere:
    # lag_t = raw_t - ema_t = d_t * (lag_{t-1} + change_t), starting from 0.
    lag = 0.0
    for step, change in enumerate((1.0, 2.0, 3.0)):
        lag = warmup_decay(0.5, step) * (lag + change)
    for report in reports:
        assert report["dtensor"] and report["loaded_equal"] and report["swapped_equal"]
        assert report["restored_equal"] and report["forward_finite"]
        for name, values in report["ema_minus_raw"].items():
            assert all(abs(v + lag) < 1e-5 for v in values), (name, values[:3], lag)
    assert reports[0]["local_rows"] != reports[1]["local_rows"]  # uneven shards were exercised
