"""The training dry run: the paper model sized on the meta device from its bundled configs."""

import pytest

from mumu_model.paper_configs import known_config_dir
from mumu_model.training.config import load_train_config
from mumu_model.training.sizing import dry_run_report, estimate

B = 10**9


@pytest.fixture(scope="module")
def paper():
    return estimate(load_train_config("configs/train_stage1_paper.yaml"), world_size=8)


def test_paper_stage1_counts(paper):
    assert 7.4 * B <= paper.encoder_params <= 7.8 * B
    assert 2.5 * B <= paper.part("unet").total <= 2.65 * B
    assert 0.7 * B <= paper.part("adapter").total <= 0.9 * B
    assert 0.07 * B <= paper.part("vae").total <= 0.09 * B
    assert paper.part("vision").trainable == 0  # Table 1: the ViT is frozen
    assert 0.8 * B <= paper.trainable_params <= 0.9 * B


def test_paper_stage1_fits_on_8_h100(paper):
    assert paper.world_size == 8 and paper.batch_size == 4 and paper.activation_checkpointing
    assert paper.fits
    assert 20 * 2**30 <= paper.peak_bytes <= 32 * 2**30  # roughly 25-30 GB


def test_report_prints_table_and_verdict(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    report = dry_run_report(load_train_config("configs/train_stage1_paper.yaml"))
    assert "module" in report and "trainable" in report and "adapter" in report
    assert "world size 8 (default" in report
    assert report.splitlines()[-1] == "fits in 80 GB (H100): yes"


def test_world_size_from_environment(monkeypatch, paper):
    monkeypatch.setenv("WORLD_SIZE", "16")
    config = load_train_config("configs/train_stage1_paper.yaml")
    sixteen = estimate(config)
    assert sixteen.world_size == 16 and sixteen.world_size_rule == "from $WORLD_SIZE"
    assert sixteen.peak_bytes < paper.peak_bytes  # more shards, less per GPU


def test_tiny_config_dry_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = estimate(load_train_config("configs/train_tiny.yaml"))
    assert result.world_size == 1
    assert 0 < result.trainable_params <= result.total_params < 10**7
    assert "not sharded" in dry_run_report(load_train_config("configs/train_tiny.yaml"))


def test_unknown_hub_id_names_the_field():
    config = load_train_config(
        "configs/train_stage1_paper.yaml", ["model_overrides.encoder=someone/unknown-vlm"]
    )
    with pytest.raises(ValueError, match=r"model_overrides\.encoder='someone/unknown-vlm'"):
        estimate(config, world_size=8)


def test_known_config_dirs():
    assert (known_config_dir("HuggingFaceM4/idefics2-8b") / "config.json").is_file()
    assert (known_config_dir("stabilityai/stable-diffusion-xl-base-1.0") / "unet" / "config.json").is_file()
    assert known_config_dir("someone/else") is None


def test_init_from_pipeline_folder(tiny_pipeline_dir):
    config = load_train_config("configs/train_tiny.yaml", [f"init_from={tiny_pipeline_dir}", "unet=lora"])
    result = estimate(config, world_size=1)
    assert 0 < result.part("unet").trainable < result.part("unet").total
    assert result.part("adapter").trainable == result.part("adapter").total


def test_init_from_missing_folder_is_an_error(tmp_path):
    config = load_train_config("configs/train_tiny.yaml", [f"init_from={tmp_path}"])
    with pytest.raises(ValueError, match="init_from="):
        estimate(config, world_size=1)


def test_a_model_that_does_not_fit_the_world_size_fails_before_loading():
    from mumu_model.training.sizing import check_fits

    config = load_train_config("configs/train_stage1_paper.yaml")
    assert check_fits(config, 8, 80 * 2**30).fits
    too_big = load_train_config("configs/train_stage1_paper.yaml", ["batch_size=64"])
    with pytest.raises(ValueError, match=r"does not fit: estimated peak .* per GPU on 8 GPU\(s\) of 80\.0 GiB at batch_size 64"):
        check_fits(too_big, 8, 80 * 2**30)


def test_hsdp_shards_over_its_group_not_the_world(paper):
    """16 GPUs as 2 replicas of 8-way FSDP hold per GPU what one 8-GPU node does."""
    hsdp = estimate(load_train_config("configs/train_stage1_paper.yaml", ["hsdp_replicas=2"]), world_size=16)
    assert [size for _, size in hsdp.memory] == [size for _, size in paper.memory]
    assert hsdp.peak_bytes == paper.peak_bytes and "/ 8" in hsdp.memory[0][0]
    with pytest.raises(ValueError, match="hsdp_replicas=3 does not divide the world size 16"):
        estimate(load_train_config("configs/train_stage1_paper.yaml", ["hsdp_replicas=3"]), world_size=16)
