"""Two processes on CPU: torchrun + gloo + FSDP2 (fully_shard applied from outside the model).

One torchrun run of a small driver around the real `Trainer`: full training at lr 1e-3 on a
fixed batch per rank, with activation checkpointing and a validation generation (which under
FSDP2 runs on every rank). Each rank writes its loss before/after on a fixed batch and a hash
of the full (gathered) state dict; rank 0 writes the checkpoints and the final pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from mumu_model.data.shards import write_shard
from mumu_model.training.checkpoint import CheckpointManager

from .distributed import run_two
from .test_training import FULL, records, tiny


DRIVER = '''
import hashlib, json, sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mumu_model.training import parallel
from mumu_model.training.config import load_train_config
from mumu_model.training.trainer import Trainer

trainer = Trainer(load_train_config(sys.argv[1]))
out = Path(sys.argv[2])
batch = next(trainer.batches)  # this rank's fixed batch (2 records per rank, batch 2)


def fixed_loss():  # collective under FSDP2: every rank calls it
    with torch.no_grad():
        return float(trainer.compute_loss(batch, torch.Generator().manual_seed(7)))


before = fixed_loss()
finish = trainer.finish


def finish_and_report():
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    report = {
        "rank": trainer.dist.rank, "world_size": trainer.dist.world_size, "hash": digest.hexdigest(),
        "tensors": len(state), "before": before, "after": fixed_loss(), "losses": trainer.losses,
        "keys": batch["keys"], "sharded": type(trainer.model.unet).__name__,
        "mesh": list(next(trainer.model.parameters()).device_mesh.shape),
    }
    (out / f"rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    return finish()


trainer.finish = finish_and_report
trainer.train()
parallel.shutdown_distributed()
'''


def test_two_process_fsdp2_on_cpu(tmp_path):
    shard = write_shard(tmp_path / "shards" / "00000.tar", records(4)).path
    Image.new("RGB", (16, 16), (30, 200, 30)).save(tmp_path / "green.png")
    config = tiny(
        tmp_path, shard, max_steps=8, checkpoint_every=4, conditioning_dropout=0.0, augment_probability=0.0,
        activation_checkpointing=True, validate_every=4, validation_prompts=("a <img:green.png> circle",),
        validation_image_root=str(tmp_path), validation_steps=2, **FULL,
    )
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    code, output = run_two(driver, config_file, tmp_path, timeout=280)
    assert code == 0, output[-8000:]

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["sharded"].startswith("FSDP")
        assert len(report["losses"]) == 8 and all(abs(x) < float("inf") for x in report["losses"])
        assert report["after"] < 0.8 * report["before"], report
    print({r["rank"]: (round(r["before"], 3), round(r["after"], 3)) for r in reports})
    assert reports[0]["hash"] == reports[1]["hash"]  # the ranks agree on every weight
    assert set(reports[0]["keys"]).isdisjoint(reports[1]["keys"])  # each rank has its own data
    assert reports[0]["losses"] == reports[1]["losses"]  # the logged loss is the mean over ranks

    (run,) = (Path(config.output_dir) / "runs").iterdir()
    manager = CheckpointManager(run)
    assert [step for step, _ in manager.complete()] == [4, 8]
    state = json.loads((manager.latest() / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    # Each rank wrote its own shards of the weights: no rank gathered the model to save it.
    assert len(list((manager.latest() / "weights").glob("*.safetensors"))) == 2
    assert (Path(config.output_dir) / "pipeline" / "model_index.json").is_file()


def test_hsdp_replicates_across_groups_and_trains_like_fsdp(tmp_path):
    """hsdp_replicas=2 on 2 ranks: a (2, 1) mesh, each rank a whole replica; the ranks agree on
    every weight and the losses are those of the plain FSDP run on the same data."""
    shard = write_shard(tmp_path / "shards" / "00000.tar", records(4)).path
    losses = {}
    for replicas in (1, 2):
        folder = tmp_path / f"replicas{replicas}"
        folder.mkdir()
        config = tiny(folder, shard, max_steps=3, checkpoint_every=3, conditioning_dropout=0.0,
                      augment_probability=0.0, validate_every=0, validation_prompts=(), hsdp_replicas=replicas,
                      **FULL)
        config_file = folder / "train.yaml"
        config_file.write_text(yaml.safe_dump(config.to_dict()))
        driver = folder / "driver.py"
        driver.write_text(DRIVER)
        code, output = run_two(driver, config_file, folder, timeout=280)
        assert code == 0, output[-8000:]
        reports = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        assert reports[0]["hash"] == reports[1]["hash"]
        assert reports[0]["mesh"] == ([2] if replicas == 1 else [2, 1])
        losses[replicas] = reports[0]["losses"]
    assert len(losses[2]) == 3
    for fsdp, hsdp in zip(losses[1], losses[2]):
        assert abs(fsdp - hsdp) <= 1e-4 * max(1.0, abs(fsdp)), losses
