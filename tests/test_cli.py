import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mumu_model.cli import main
from mumu_model.devices import DTYPE_NAMES, resolve_device_dtype

REPO = Path(__file__).resolve().parents[1]


def test_generate_writes_a_png(tiny_pipeline_dir, tmp_path, red_square, capsys):
    red_square.save(tmp_path / "red.png")
    out = tmp_path / "out" / "sample.png"
    code = main(["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a <img:red.png> circle",
                 "--image-root", str(tmp_path), "--out", str(out), "--steps", "3", "--quiet"])
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["sample.png"]  # no temp file left behind


def test_init_builds_a_loadable_pipeline(tmp_path):
    from mumu_model import MUMUPipeline

    out = tmp_path / "tiny"
    assert main(["init", "--profile", "tiny", "--set", "image_size=56", "--out", str(out)]) == 0
    assert MUMUPipeline.from_pretrained(out).tokens_per_image == 16
    assert main(["init", "--profile", "tiny", "--out", str(out)]) == 2  # refuses to overwrite


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "a <img:../etc/passwd> x"], "outside the allowed image root"),
        (["--prompt", "a <img:red.png x"], "unclosed image tag"),
        (["--prompt", "a <b> x"], "unknown tag"),
        (["--prompt", "a <img:nope.png>"], "nope.png"),
        (["--out", "x.unknownext"], "unknown image extension"),
    ],
)
def test_user_mistakes_are_one_line_errors(tiny_pipeline_dir, tmp_path, capsys, args, message):
    base = {"--model": str(tiny_pipeline_dir), "--prompt": "a dog", "--out": str(tmp_path / "o.png")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["generate", "--steps", "1", "--quiet", "--image-root", str(tmp_path)]
    for flag, value in base.items():
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mumu: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()


def test_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "o.png")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "a", "--out", str(tmp_path / "o.png")]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "mumu_model.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "init", "lora"):
        assert command in result.stdout


# -- device and dtype ------------------------------------------------------------------------


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_device_dtype_defaults_and_names(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert resolve_device_dtype() == ("cpu", torch.float32)
    assert resolve_device_dtype("auto", "bf16") == ("cpu", torch.bfloat16)
    assert resolve_device_dtype("CPU", torch.float32) == ("cpu", torch.float32)
    _fake_cuda(monkeypatch, 2)  # only parsed here, nothing is put on a GPU
    assert resolve_device_dtype() == ("cuda:0", torch.bfloat16)  # this worker's GPU, see test_devices.py
    assert resolve_device_dtype("cuda:1", "fp16") == ("cuda:1", torch.float16)
    assert resolve_device_dtype("cpu") == ("cpu", torch.float32)


def test_resolve_device_dtype_names_the_same_dtypes_as_build():
    from mumu_model.build import DTYPES

    assert {name: getattr(torch, name) for name in DTYPE_NAMES} == DTYPES


@pytest.mark.parametrize(
    "device, dtype, cuda_devices, message",
    [
        ("gpu", None, 0, "device 'gpu': not a device"),
        ("xla", None, 0, "device 'xla': not supported"),
        ("cuda", None, 0, "device 'cuda': CUDA is not available"),
        ("cuda:2", None, 2, "this machine has 2 CUDA device(s)"),
        ("cpu", "int8", 0, "dtype 'int8': unknown"),
        ("cpu", "float16", 0, "float16 on device 'cpu'"),
        (None, "fp16", 0, "float16 on device 'cpu'"),
        ("cpu", torch.float64, 0, "unsupported"),
    ],
)
def test_resolve_device_dtype_refuses(monkeypatch, device, dtype, cuda_devices, message):
    _fake_cuda(monkeypatch, cuda_devices)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_device_dtype(device, dtype)


# -- generate: every mistake is caught before a model is loaded ------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to load a pipeline (or the evaluation's metric models) fails the test."""
    from mumu_model.pipeline import MUMUPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(MUMUPipeline, "from_pretrained", refuse)
    monkeypatch.setattr("eval.run.load_scorers", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mumu: error:") and err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--guidance", "-1"], "--guidance -1.0: must be a number >= 0"),
        (["--guidance", "nan"], "--guidance nan"),
        (["--height", "0"], "--height 0: must be a positive number"),
        (["--width", "30"], "--width 30: this model's output sides must be multiples of 4"),
        (["--prompt", "a <img:red.png x"], "unclosed image tag"),
        (["--negative-prompt", "a <b>"], "unknown tag"),
        (["--prompt", "a <img:nope.png>"], "nope.png"),
        (["--image-root", "{tmp}/nowhere"], "--image-root {tmp}/nowhere: no such folder"),
        (["--out", "{tmp}/o.txt"], "unknown image extension"),
        (["--out", "{tmp}/a_file/o.png"], "a_file is not a folder"),
        (["--out", "{tmp}/folder.png"], "is a folder; give a file name"),
        (["--device", "gpu"], "--device 'gpu': not a device"),
        (["--dtype", "int8"], "--dtype 'int8': unknown; use float32, bfloat16, float16"),
        (["--device", "cpu", "--dtype", "float16"], "--dtype float16 on device 'cpu'"),
        (["--model", "{tmp}/incomplete"], "--model: pipeline {tmp}/incomplete is incomplete"),
    ],
)
def test_generate_checks_arguments_before_loading(tiny_pipeline_dir, tmp_path, capsys, no_model_loading,
                                                  flags, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "incomplete").mkdir()
    (tmp_path / "incomplete" / "model_index.json").write_text((tiny_pipeline_dir / "model_index.json").read_text())
    Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    values = {"--model": str(tiny_pipeline_dir), "--prompt": "a <img:red.png> dog", "--image-root": str(tmp_path),
              "--out": str(tmp_path / "o.png")}
    values.update({flag: value.format(tmp=tmp_path) for flag, value in zip(flags[::2], flags[1::2])})
    argv = ["generate", "--quiet"] + [item for pair in values.items() for item in pair]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)
    assert not (tmp_path / "o.png").exists()


def test_generate_refuses_cuda_without_cuda(tiny_pipeline_dir, tmp_path, capsys, no_model_loading, monkeypatch):
    _fake_cuda(monkeypatch, 0)
    argv = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a", "--out", str(tmp_path / "o.png"),
            "--device", "cuda"]
    assert main(argv) == 2
    assert "--device 'cuda': CUDA is not available on this machine; use cpu" in _one_line_error(capsys)


def test_bad_option_type_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "m", "--prompt", "a", "--out", "o.png", "--steps", "many"])
    assert exit_info.value.code == 2
    assert "argument --steps: invalid int value: 'many' (see mumu generate --help)" in _one_line_error(capsys)


def test_generate_loads_in_the_dtype_on_the_device(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    from mumu_model.pipeline import MUMUPipeline

    loaded = {}
    original = MUMUPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MUMUPipeline, "from_pretrained", classmethod(spy))
    out = tmp_path / "bf16.png"
    argv = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a dog", "--out", str(out), "--steps", "1",
            "--device", "cpu", "--dtype", "bf16", "--quiet"]
    assert main(argv) == 0
    assert loaded["torch_dtype"] == torch.bfloat16
    assert "cpu bfloat16" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (64, 64)


# -- eval run: the same checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--guidance", "-2"], "--guidance -2.0"),
        (["--resolution", "30"], "--resolution 30: this model's output sides must be multiples of 4"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cpu", "--dtype", "half"], "--dtype float16 on device 'cpu'"),
        (["--out", "{tmp}/a_file"], "exists and is not a folder"),
        (["--suite", "{tmp}/no_suite.yaml"], "no_suite.yaml"),
        (["--model", "{tmp}/nowhere"], "no such folder"),
    ],
)
def test_eval_run_checks_arguments_before_loading(tiny_pipeline_dir, tmp_path, capsys, no_model_loading,
                                                  flags, message):
    (tmp_path / "a_file").write_text("not a folder")
    values = {"--model": str(tiny_pipeline_dir), "--out": str(tmp_path / "eval"), "--suite": "single_subject"}
    values.update({flag: value.format(tmp=tmp_path) for flag, value in zip(flags[::2], flags[1::2])})
    argv = ["eval", "run", "--no-mlflow", "--quiet"] + [item for pair in values.items() for item in pair]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)
    assert not (tmp_path / "eval").exists()


# -- train --dry-run -------------------------------------------------------------------------

TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"


def _dry_run_report():
    try:
        from mumu_model.training.sizing import dry_run_report
    except ImportError as err:
        pytest.skip(f"mumu_model.training.sizing.dry_run_report is not importable yet: {err}")
    return dry_run_report


def test_train_dry_run_prints_the_sizing_report_and_trains_nothing(capsys, monkeypatch):
    dry_run_report = _dry_run_report()
    from mumu_model.training import trainer
    from mumu_model.training.config import load_train_config

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run started training")

    monkeypatch.setattr(trainer, "run", refuse)
    overrides = ["max_steps=10"]
    code = main(["train", str(TINY_CONFIG), "--dry-run", "--world-size", "2", "--set", overrides[0]])
    assert code == 0, capsys.readouterr().err
    expected = dry_run_report(load_train_config(TINY_CONFIG, overrides), world_size=2)
    assert capsys.readouterr().out == expected + "\n"


def test_python_m_training_dry_run():
    _dry_run_report()
    result = subprocess.run([sys.executable, "-m", "mumu_model.training", str(TINY_CONFIG), "--dry-run"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/none.yaml", "--dry-run"], "none.yaml: no such config file"),
        (["{tmp}/bad.yaml", "--dry-run"], "unknown field 'no_such_field'"),
        (["{config}", "--dry-run", "--set", "max_steps=ten"], "max_steps"),
        (["{config}", "--dry-run", "--world-size", "0"], "--world-size 0: must be at least 1"),
        (["{config}", "--world-size", "2"], "--world-size is only used with --dry-run"),
    ],
)
def test_train_dry_run_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, argv, message):
    from mumu_model.training import trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "bad.yaml").write_text("no_such_field: 1\n")
    argv = [a.format(tmp=tmp_path, config=TINY_CONFIG) for a in argv]
    assert main(["train", *argv]) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)


# -- lora merge ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    """A tiny MUMU pipeline, a LoRA exported from its UNet, and an SDXL-layout UNet folder."""
    import copy

    from mumu_model.lora import add_unet_lora, export_unet_lora
    from mumu_model.pipeline import MUMUPipeline
    from mumu_model.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("merge")
    model = tiny_pipeline(root / "mumu")
    unet = MUMUPipeline.from_pretrained(model).unet
    lora = export_unet_lora(add_unet_lora(copy.deepcopy(unet), rank=2), root / "lora")
    unet.save_pretrained(root / "community" / "unet")
    return {"--model": str(model), "--lora": str(lora), "--unet": str(root / "community")}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora", "{tmp}/nope"], "--lora {tmp}/nope: no such file or folder"),
        (["--lora", "{tmp}/empty"], "holds no pytorch_lora_weights.safetensors"),
        (["--lora", "{tmp}/garbage.safetensors"], "cannot merge: LoRA file {tmp}/garbage.safetensors is not"),
        (["--unet", "{tmp}/nope"], "--unet {tmp}/nope: no such folder"),
        (["--unet", "{tmp}/empty"], "not a UNet folder (no config.json, nor unet/config.json)"),
        (["--unet", "{tmp}/config_only"], "no .safetensors weights"),
        (["--unet", "{tmp}/a_file"], "--unet {tmp}/a_file: not a folder"),
        (["--unet", "{tmp}/bad_weights"], "cannot merge:"),
        (["--model", "{tmp}/nope"], "--model {tmp}/nope: no such folder"),
        (["--model", "{tmp}/empty"], "no model_index.json"),
        (["--out", "{tmp}/a_file"], "--out {tmp}/a_file: exists and is not a folder"),
        (["--scale", "inf"], "--scale inf: must be a finite number"),
    ],
)
def test_lora_merge_mistakes_are_one_line_errors(merge_inputs, tmp_path, capsys, flags, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    unet_dir = Path(merge_inputs["--unet"]) / "unet"
    for name in ("config_only", "bad_weights"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((unet_dir / "config.json").read_text())
    (tmp_path / "bad_weights" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    values = {**merge_inputs, "--out": str(tmp_path / "merged")}
    values.update({flag: value.format(tmp=tmp_path) for flag, value in zip(flags[::2], flags[1::2])})
    argv = ["lora", "merge"] + [item for pair in values.items() for item in pair]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)
    assert not (tmp_path / "merged").exists()


# -- more one-line mistakes: generate, a model path that is not there, init ------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "-3"], "--steps -3: must be at least 1"),
        (["--guidance", "-0.5"], "--guidance -0.5: must be a number >= 0"),
        (["--negative-prompt", "<img:nope.png>"], "image 'nope.png': no such file"),
        (["--prompt", "a <img:sub/nope.png> dog"], "image 'sub/nope.png': no such file"),
        (["--prompt", "a <img:not_an_image.png> dog"], "not a recognised image file"),
        (["--model", "{tmp}/a_file"], "--model: pipeline {tmp}/a_file: no such folder"),
    ],
)
def test_generate_mistakes_are_one_line_errors(tiny_pipeline_dir, tmp_path, capsys, no_model_loading, flags, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "not_an_image.png").write_text("not an image")
    values = {"--model": str(tiny_pipeline_dir), "--prompt": "a dog", "--image-root": str(tmp_path),
              "--out": str(tmp_path / "o.png")}
    values.update({flag: value.format(tmp=tmp_path) for flag, value in zip(flags[::2], flags[1::2])})
    assert main(["generate", "--quiet"] + [item for pair in values.items() for item in pair]) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)
    assert not (tmp_path / "o.png").exists()


def test_a_relative_model_path_that_is_not_there_is_no_such_folder(tmp_path, capsys, monkeypatch):
    """"outputs/typo" may be a hub id, so loading is tried; its failure still names the folder."""
    from mumu_model.pipeline import MUMUPipeline

    def not_on_the_hub(*args, **kwargs):
        raise OSError("Cannot load model outputs/typo: the model is not fully cached locally\nmore detail")

    monkeypatch.setattr(MUMUPipeline, "from_pretrained", not_on_the_hub)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "outputs/typo", "--prompt", "a dog", "--out", "o.png", "--quiet"]) == 2
    assert "--model outputs/typo: no such folder (as a hub id: Cannot load model" in _one_line_error(capsys)


def test_quiet_stderr_holds_only_the_error_line(tmp_path):
    """The whole process with --quiet: no traceback, no library warning or log line before the
    error (hub access off, so the hub id fails at once)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "mumu_model.cli", "generate", "--model", "outputs/typo", "--prompt", "a dog",
         "--out", "o.png", "--steps", "1", "--dtype", "float32", "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("mumu: error: --model outputs/typo: no such folder"), result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", "{tmp}/a_file"], "--out {tmp}/a_file: exists and is not a folder"),
        (["--config", "{tmp}/none.yaml"], "--config {tmp}/none.yaml: no such file"),
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--profile", "paper", "--set", "encoder={tmp}/nope", "--set", "sdxl={tmp}/nope"],
         "config field encoder={tmp}/nope: no such folder"),
        (["--profile", "paper", "--set", "encoder={tmp}/empty", "--set", "sdxl={tmp}/empty"],
         "--profile paper: cannot load its checkpoints:"),
    ],
)
def test_init_mistakes_are_one_line_errors(tmp_path, capsys, flags, message):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "pipeline")]
    assert main(["init", *out, *flags]) == 2
    assert message.format(tmp=tmp_path) in _one_line_error(capsys)
    assert not (tmp_path / "pipeline").exists()
