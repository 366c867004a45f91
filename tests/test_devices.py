"""Each worker resolves its own accelerator; no GPU is touched (CUDA is faked by monkeypatch)."""

import re

import pytest
import torch

from mumu_model.devices import resolve_device_dtype
from mumu_model.devices import check_worker_devices, worker_device

ENVS = ("MUMU_DEVICE", "LOCAL_RANK", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _env(monkeypatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


# -- worker_device ---------------------------------------------------------------------------


def test_without_cuda_auto_is_cpu_and_cuda_is_refused(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    _env(monkeypatch, LOCAL_RANK="1")
    assert worker_device() == worker_device(None) == worker_device("auto") == "cpu"
    assert worker_device("CPU") == "cpu"
    with pytest.raises(ValueError, match=re.escape("device 'cuda': CUDA is not available")):
        worker_device("cuda")
    with pytest.raises(ValueError, match=re.escape("scorer.device 'cuda:0': CUDA is not available")):
        worker_device("cuda:0", setting="scorer.device")


def test_single_worker_uses_the_first_gpu(monkeypatch):
    _fake_cuda(monkeypatch, 4)
    assert worker_device() == worker_device("cuda") == "cuda:0"
    assert worker_device("cuda:3") == "cuda:3"
    assert worker_device("cpu") == "cpu"


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LOCAL_RANK": "1"}, "cuda:1"),  # torchrun, all GPUs visible
        ({"SLURM_LOCALID": "2"}, "cuda:2"),  # srun without per-task GPU binding
        ({"LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, "cuda:3"),  # torchrun inside srun: LOCAL_RANK wins
        ({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3,4,5"}, "cuda:1"),  # rank indexes the visible set
    ],
)
def test_local_rank_selects_among_visible_gpus(monkeypatch, env, expected):
    _fake_cuda(monkeypatch, 4)
    _env(monkeypatch, **env)
    assert worker_device() == worker_device("auto") == expected
    assert worker_device("cuda") == expected  # an explicit "cuda" is this worker's GPU too
    assert worker_device("cuda:0") == "cuda:0"  # an index is honoured as given
    assert worker_device("cpu") == "cpu"


@pytest.mark.parametrize(
    "env",
    [
        {"CUDA_VISIBLE_DEVICES": "5"},  # a Ray GPU actor, or one GPU per Kubernetes pod
        {"SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"},  # srun --gpus-per-task=1
        {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "GPU-3f2a"},  # a launcher pinned each rank
    ],
)
def test_a_narrowed_visible_set_is_this_workers_own(monkeypatch, env):
    _fake_cuda(monkeypatch, 1)
    _env(monkeypatch, **env)
    assert worker_device() == worker_device("cuda") == "cuda:0"
    with pytest.raises(ValueError, match=re.escape("device 'cuda:1': this machine has 1 CUDA device(s)")):
        worker_device("cuda:1")


def test_more_workers_than_gpus_is_an_error_naming_the_variable(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    _env(monkeypatch, LOCAL_RANK="2")
    with pytest.raises(ValueError, match=re.escape("LOCAL_RANK=2: this host has 2 visible CUDA device(s)")):
        worker_device()
    _env(monkeypatch, LOCAL_RANK="one")
    with pytest.raises(ValueError, match=re.escape("LOCAL_RANK='one': not a local rank")):
        worker_device("cuda")


def test_mumu_device_pins_the_worker(monkeypatch):
    _fake_cuda(monkeypatch, 4)
    _env(monkeypatch, LOCAL_RANK="1", MUMU_DEVICE="cuda:2")
    assert worker_device() == worker_device("cuda") == "cuda:2"
    assert worker_device("cuda:3") == "cuda:3" and worker_device("cpu") == "cpu"
    _env(monkeypatch, MUMU_DEVICE="cpu")
    assert worker_device() == "cpu"
    assert worker_device("cuda") == "cuda:1"  # asked for a GPU: this worker's, not the CPU pin
    _env(monkeypatch, MUMU_DEVICE="auto")
    assert worker_device() == "cuda:1"
    _env(monkeypatch, MUMU_DEVICE="cuda:7")
    with pytest.raises(ValueError, match=re.escape("MUMU_DEVICE 'cuda:7': this machine has 4 CUDA device(s)")):
        worker_device()


@pytest.mark.parametrize(
    "requested, message",
    [
        ("gpu", "synthesis.device 'gpu': not a device"),
        ("xla", "synthesis.device 'xla': not supported"),
        ("cuda:4", "synthesis.device 'cuda:4': this machine has 4 CUDA device(s), cuda:0 to cuda:3"),
    ],
)
def test_bad_devices_name_the_setting(monkeypatch, requested, message):
    _fake_cuda(monkeypatch, 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        worker_device(requested, setting="synthesis.device")


def test_cli_resolution_uses_the_workers_gpu(monkeypatch):
    _fake_cuda(monkeypatch, 4)
    _env(monkeypatch, LOCAL_RANK="1")
    assert resolve_device_dtype() == ("cuda:1", torch.bfloat16)
    assert resolve_device_dtype("cuda", "fp32") == ("cuda:1", torch.float32)
    assert resolve_device_dtype("cuda:2") == ("cuda:2", torch.bfloat16)


# -- check_worker_devices --------------------------------------------------------------------


def test_check_worker_devices_hands_each_worker_its_gpus(monkeypatch):
    _fake_cuda(monkeypatch, 4)
    assert check_worker_devices(4) == ["0", "1", "2", "3"]
    assert check_worker_devices(2, devices_per_worker=2) == ["0,1", "2,3"]
    assert check_worker_devices(3, devices_per_worker=0) == ["", "", ""]
    _env(monkeypatch, CUDA_VISIBLE_DEVICES="4,5,6,7")  # an outer restriction is kept
    assert check_worker_devices(2) == ["4", "5"]


@pytest.mark.parametrize(
    "gpus, workers, per_worker, message",
    [
        (4, 5, 1, "--workers=5 needs 5 GPU(s), but this host has 4 visible; lower --workers to at most 4"),
        (4, 3, 2, "--workers=3 x 2 GPUs each needs 6 GPU(s), but this host has 4 visible; "
                  "lower --workers to at most 2"),
        (0, 1, 1, "--workers=1 needs 1 GPU(s), but this host has 0 visible"),
        (4, 0, 1, "--workers=0: need at least 1 worker"),
    ],
)
def test_check_worker_devices_refuses_more_workers_than_gpus(monkeypatch, gpus, workers, per_worker, message):
    _fake_cuda(monkeypatch, gpus)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_worker_devices(workers, devices_per_worker=per_worker, setting="--workers")


# -- the data resources ----------------------------------------------------------------------


def test_every_resource_device_is_the_workers_gpu(monkeypatch):
    from mumu_assets import resources

    _fake_cuda(monkeypatch, 2)
    _env(monkeypatch, LOCAL_RANK="1")
    for resource in [
        resources.ContentStyleBackend(), resources.SDXLSynthesis(), resources.ScorerBackend(model="m"),
        resources.GroundingDinoDetection(), resources.RealImageModels(), resources.ControlImageModels(),
    ]:
        assert resources._device(resource) == "cuda:1", type(resource).__name__
    with pytest.raises(ValueError, match=re.escape("GroundingDinoDetection.device 'cuda:2': this machine has 2")):
        resources._device(resources.GroundingDinoDetection(device="cuda:2"))


def test_scorer_loads_on_the_workers_gpu(monkeypatch):
    """The wire from the resource to the model class, with a stand-in that loads nothing."""
    from mumu_assets.resources import ScorerBackend
    from mumu_model.data import scoring

    class StandIn:
        def __init__(self, model, processor=None, *, device="cpu"):
            self.device = device

    monkeypatch.setattr(scoring, "PickScorer", StandIn)
    _fake_cuda(monkeypatch, 2)
    _env(monkeypatch, LOCAL_RANK="1")
    assert ScorerBackend(model="pickscore").get().device == "cuda:1"
    assert ScorerBackend(model="pickscore", device="cpu").get().device == "cpu"


def test_synthesis_loads_on_the_workers_gpu_in_its_dtype(monkeypatch):
    from mumu_assets.resources import SDXLSynthesis
    from mumu_model.data import synthesis

    class StandIn:
        def __init__(self, model, **kwargs):
            self.device, self.dtype = kwargs["device"], kwargs["dtype"]

    monkeypatch.setattr(synthesis, "SDXLSynthesizer", StandIn)
    _fake_cuda(monkeypatch, 2)
    _env(monkeypatch, LOCAL_RANK="1")
    built = SDXLSynthesis(model="sdxl", dtype="bfloat16").build_synthesizer(64, 64, 1, 5.0, 1)
    assert (built.device, built.dtype) == ("cuda:1", torch.bfloat16)
    with pytest.raises(ValueError, match=re.escape("SDXLSynthesis.dtype 'int8': unknown")):
        SDXLSynthesis(model="sdxl", dtype="int8").build_synthesizer(64, 64, 1, 5.0, 1)


def test_workers_sharing_a_pool_lease_different_devices_until_they_exit(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        from mumu_model.devices import lease_device
        print(lease_device(["dev-a", "dev-b"], {str(tmp_path)!r}, wait_s=float(sys.argv[1])), flush=True)
        time.sleep(float(sys.argv[2]))
    """)

    def start(wait_s, hold_s):
        return subprocess.Popen([sys.executable, "-c", script, str(wait_s), str(hold_s)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first, second = start(5, 60), start(5, 60)
    got = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert got == {"dev-a", "dev-b"}
    third = start(0.5, 0)  # every device is held: it gives up, naming the pool
    _, err = third.communicate(timeout=30)
    assert third.returncode != 0 and "every device is held" in err
    first.kill()  # a SIGKILLed holder frees its device
    first.wait()
    fourth = start(10, 0)
    out, _ = fourth.communicate(timeout=30)
    second.kill()
    second.wait()
    assert out.strip() in {"dev-a", "dev-b"}


# -- casting weights --------------------------------------------------------------------------------


def test_cast_weights_keeps_fp32_modules_and_says_nothing(pipe, capfd):
    from mumu_model.devices import cast_pipeline, cast_weights

    capfd.readouterr()
    cast_pipeline(pipe, torch.float32)  # already float32: nothing to do
    cast_pipeline(pipe, torch.bfloat16)
    assert {p.dtype for p in pipe.unet.parameters()} == {p.dtype for p in pipe.adapter.parameters()} == {torch.bfloat16}
    # diffusers' ModelMixin.to warns at every dtype cast, even for models with no fp32 modules.
    out = capfd.readouterr()
    assert "should be kept in float32" not in out.out + out.err
    vae = pipe.vae
    vae._keep_in_fp32_modules = ["quant_conv"]  # a model that lists some, as from_pretrained keeps them
    cast_weights(vae, torch.float32)
    cast_weights(vae, torch.bfloat16)
    assert {p.dtype for p in vae.quant_conv.parameters()} == {torch.float32}
    assert {p.dtype for p in vae.decoder.parameters()} == {torch.bfloat16}
