"""The meta-device build (`build_sharded`) equals the eager `setup_model` build, tensor for tensor.

One process: parameters, buffers (rotary inv_freq is computed, not loaded) and a forward of
`MUMUTrainModel`, for each source of weights: a saved pipeline (`init_from`), the tiny
profile (built), and a profile whose encoder / SDXL are folders (the adapter built new).
Two processes under torchrun (gloo, CPU, FSDP2): the gathered full state dict and the forward
equal the eager build's on both ranks, and each rank holds only its half of every parameter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mumu_model.encoder import encoder_inputs
from mumu_model.pipeline import MUMUPipeline
from mumu_model.prompt import MultimodalPrompt
from mumu_model.training.config import TrainConfig
from mumu_model.training import sharded_init
from mumu_model.training.sharded_init import SafetensorsFolder, build_sharded, named_state

from .distributed import run_two
from mumu_model.training.trainer import load_base_pipeline, setup_model

CPU = torch.device("cpu")


def config(**fields) -> TrainConfig:
    values = dict(model_profile="tiny", image_size=28, resolution=32, seed=3, shards=("unused.tar",))
    values.update(fields)
    return TrainConfig(**values)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, persistent and non-persistent buffers, by their plain names."""
    tensors = dict(named_state(model))
    tensors.update({name.replace("_checkpoint_wrapped_module.", ""): b for name, b in model.named_buffers()})
    return tensors


def forward(pipe: MUMUPipeline, model: torch.nn.Module, grad: bool = False) -> torch.Tensor:
    prompts = [MultimodalPrompt(["a ", Image.new("RGB", (20, 20), (200, 10, 10)), " circle"]), MultimodalPrompt()]
    inputs = encoder_inputs(pipe.processor, prompts)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)
    with torch.enable_grad() if grad else torch.no_grad():
        return model(inputs, latents, torch.tensor([10, 700]), time_ids)


def assert_same(eager: dict[str, torch.Tensor], built: dict[str, torch.Tensor]) -> None:
    assert set(eager) == set(built)
    different = [name for name in eager if not torch.equal(eager[name], built[name])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def encoder_folder(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """An Idefics2-style encoder checkpoint: weights (under "model.", as a full Idefics2
    checkpoint has them, sharded with an index) and the processor in one folder."""
    pipe = MUMUPipeline.from_pretrained(tiny_pipeline_dir)
    folder = tmp_path_factory.mktemp("encoder")
    pipe.encoder.save_pretrained(folder, max_shard_size="100KB")
    pipe.processor.save_pretrained(folder)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for file in set(index["weight_map"].values()):
        save_file({f"model.{k}": v for k, v in load_file(folder / file).items()}, folder / file)
    index["weight_map"] = {f"model.{k}": v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """unet/, vae/, scheduler/ of the tiny pipeline, plus an fp16 variant beside the UNet's
    weights (as SDXL base has): it must not be read."""
    folder = tmp_path_factory.mktemp("sdxl")
    for part in ("unet", "vae", "scheduler"):
        shutil.copytree(tiny_pipeline_dir / part, folder / part)
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: torch.zeros_like(v, dtype=torch.float16) for k, v in weights.items()},
              folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    return folder


@pytest.mark.parametrize("source", ["init_from", "profile", "folders"])
def test_one_process_equals_eager(source, tiny_pipeline_dir, encoder_folder, sdxl_folder):
    fields = {
        "init_from": dict(init_from=str(tiny_pipeline_dir)),
        "profile": dict(),
        "folders": dict(model_overrides={"encoder": str(encoder_folder), "sdxl": str(sdxl_folder)}),
    }[source]
    cfg = config(**fields)
    eager_pipe, eager = setup_model(cfg)
    pipe, model = build_sharded(cfg, CPU, activation_checkpointing=True)

    assert_same(state(eager), state(model))
    assert any("lora_A" in name for name in state(model))  # the random LoRA half is compared too
    assert {n for n, p in eager.named_parameters() if p.requires_grad} == {
        n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters() if p.requires_grad
    }
    assert_same(eager_pipe.vae.state_dict(), pipe.vae.state_dict())
    assert pipe.processor.image_seq_len == eager_pipe.processor.image_seq_len
    torch.testing.assert_close(forward(pipe, model), forward(eager_pipe, eager), rtol=0, atol=0)


def test_frozen_dtype(tiny_pipeline_dir):
    cfg = config(init_from=str(tiny_pipeline_dir))
    _, eager = setup_model(cfg)
    pipe, model = build_sharded(cfg, CPU, frozen_dtype=torch.bfloat16)
    trainable = {name for name, p in eager.named_parameters() if p.requires_grad}
    for name, tensor in named_state(model):
        expected = eager.get_parameter(name) if name in trainable else eager.get_parameter(name).to(torch.bfloat16)
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}  # vae_dtype
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_structure_only(tiny_pipeline_dir):
    """What `init_from` a checkpoint starts from: its run's structure, all on meta, nothing built."""
    cfg = config(model_overrides={"adapter_layers": 3})
    pipe, sources = sharded_init._meta_structure(cfg)
    eager = load_base_pipeline(cfg)
    assert sources is None
    for part in ("encoder", "adapter", "unet"):
        shapes = {n: p.shape for n, p in getattr(pipe, part).named_parameters()}
        assert shapes == {n: p.shape for n, p in getattr(eager, part).named_parameters()}
        assert all(p.is_meta for p in getattr(pipe, part).parameters())


def test_missing_weights_are_named(tmp_path):
    save_file({"a.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    folder = SafetensorsFolder(tmp_path)
    with pytest.raises(ValueError, match="no tensor 'b.weight'"):
        folder("b.weight", torch.Size([2]), (slice(0, 2),))
    with pytest.raises(ValueError, match=r"has shape \[2\], the model \[3\]"):
        folder("a.weight", torch.Size([3]), (slice(0, 3),))
    folder.close()
    with pytest.raises(ValueError, match="no model.safetensors"):
        SafetensorsFolder(tmp_path / "empty")


DRIVER = '''
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from mumu_model.training import parallel, sharded_init
from mumu_model.training.trainer import setup_model
from tests.test_sharded_init import config, forward

dist.init_process_group("gloo")
rank, cpu = dist.get_rank(), torch.device("cpu")
cfg = config(init_from=sys.argv[1])
eager_pipe, eager = setup_model(cfg)
expected = eager.state_dict()
expected_out = forward(eager_pipe, eager)
full = StateDictOptions(full_state_dict=True)
report = {}


def check(name, model, pipe, dtype=None):
    gathered = get_model_state_dict(model, options=full)
    trainable = {n for n, p in eager.named_parameters() if p.requires_grad}
    want = {k: v if dtype is None or k in trainable else v.to(dtype) for k, v in expected.items()}
    report[name + "_keys"] = sorted(gathered) == sorted(want)
    report[name + "_equal"] = all(torch.equal(gathered[k], want[k]) for k in want if k in gathered)
    report[name + "_buffers"] = all(torch.equal(b, eager.get_buffer(parallel.clean_name(n)))
                                    for n, b in model.named_buffers())
    shards = [(p.shape, p.to_local().shape) for p in model.parameters() if isinstance(p, DTensor)]
    report[name + "_all_dtensor"] = len(shards) == len(list(model.parameters()))
    report[name + "_halves"] = all(local[0] == -(-whole[0] // 2) if rank == 0 else local[0] == whole[0] // 2
                                   for whole, local in shards)
    report[name + "_local_fraction"] = sum(l.numel() for _, l in shards) / sum(w.numel() for w, _ in shards)
    if dtype is None:
        out = forward(pipe, model)
        report[name + "_forward"] = float((out - expected_out).abs().max())
    else:  # frozen bf16 and trainable fp32 in one FSDP group: forward and backward run
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(pipe, model, grad=True)
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        report[name + "_backward"] = all(g is not None and bool(torch.isfinite(g.to_local()).all()) for g in grads)


pipe, model = sharded_init.build_sharded(cfg, cpu, activation_checkpointing=True)
check("files", model, pipe)

real_meta_base = sharded_init._meta_base
sharded_init._meta_base = lambda c: (real_meta_base(c)[0], None)  # as init_from a checkpoint
pipe, model = sharded_init.build_sharded(cfg, cpu)
sharded_init._meta_base = real_meta_base
check("rank0", model, pipe)

pipe, model = sharded_init.build_sharded(cfg, cpu, frozen_dtype=torch.bfloat16, activation_checkpointing=True)
check("bf16", model, pipe, dtype=torch.bfloat16)

with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
'''


def test_two_processes_fsdp2(tiny_pipeline_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    code, output = run_two(driver, tiny_pipeline_dir, tmp_path, timeout=240)
    assert code == 0, output[-8000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(rank, report)
        for build in ("files", "rank0", "bf16"):
            for check in ("keys", "equal", "buffers", "all_dtensor", "halves"):
                assert report[f"{build}_{check}"] is True, (rank, build, check)
            assert 0.45 < report[f"{build}_local_fraction"] < 0.55
        assert report["files_forward"] == 0.0 and report["rank0_forward"] == 0.0
        assert report["bf16_backward"] is True
