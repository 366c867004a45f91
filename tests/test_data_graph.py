"""The whole data graph materialized in-process with tiny random-weight models."""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mumu_assets.data_assets import DATA_ASSETS
from mumu_assets.definitions import build_definitions
from mumu_assets.partitions import SHARDS
from mumu_assets.resources import (
    ContentStyleBackend, ControlImageModels, DatasetStorage, GroundingDinoDetection, RealImageModels,
    ScorerBackend, SDXLSynthesis,
)
from mumu_model import testing
from mumu_model.data.shards import read_shard, sample_prompt
from mumu_model.data.versioning import dvc_hash

PROMPT_SOURCE = "examples/prompts/diffusiondb_sample.csv"
UNPARTITIONED = ["raw_prompts", "content_style"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    words = ["man", "dog", "car", "cat", "lighthouse", "woman", "scooter", "head", "girl", "horse"]
    return {
        "sdxl": testing.tiny_sdxl_pipeline(root / "sdxl"),
        "clip": testing.tiny_clip(root / "clip"),
        "gdino": testing.tiny_grounding_dino(root / "gdino", words),
        "detr": testing.tiny_detr(root / "detr", num_queries=1),
        "llava": testing.tiny_llava_next(root / "llava"),
    }


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 255, size=(80 + 8 * i, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _resources(models, data_root):
    return {
        "storage": DatasetStorage(root=str(data_root)),
        "content_style_backend": ContentStyleBackend(backend="rules"),
        "synthesis_backend": SDXLSynthesis(model=str(models["sdxl"]), device="cpu"),
        "scorer_backend": ScorerBackend(model=str(models["clip"]), device="cpu"),
        "detector_backend": GroundingDinoDetection(model=str(models["gdino"]), device="cpu"),
        "real_image_models": RealImageModels(
            captioner=str(models["llava"]), person_detector=str(models["detr"]), device="cpu"
        ),
        "control_image_models": ControlImageModels(),
    }


def _run_config(photos):
    return {"ops": {
        "raw_prompts": {"config": {"source": PROMPT_SOURCE}},
        "content_style": {"config": {"styles_per_content": 2, "num_shards": len(SHARDS.get_partition_keys())}},
        "synthetic_images": {"config": {"height": 32, "width": 32, "steps": 2, "guidance": 5.0, "batch_size": 4}},
        "filtered_synthetic": {"config": {"min_score": -1000.0}},
        "real_images": {"config": {"source": str(photos), "min_side": 64, "num_shards": len(SHARDS.get_partition_keys())}},
        "detections": {"config": {"box_threshold": 0.0, "text_threshold": 0.0}},
        "multimodal_captions_stage1": {"config": {"control_probability": 0.5}},
    }}


def _materialize(names, resources, run_config, partition_key=None):
    selected = [a for a in DATA_ASSETS if a.key.to_user_string() in names]
    config = {"ops": {k: v for k, v in run_config["ops"].items() if k in names}}
    result = dg.materialize(selected, resources=resources, run_config=config, partition_key=partition_key)
    assert result.success
    return result


def _metadata(result, name):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == name]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_data_graph_end_to_end(models, photos, tmp_path):
    data_root = tmp_path / "data"
    resources = _resources(models, data_root)
    run_config = _run_config(photos)

    prompts = _materialize(UNPARTITIONED, resources, run_config)
    raw = _metadata(prompts, "raw_prompts")
    assert raw["rows_in"] == 15 and 0 < raw["rows_out"] < raw["rows_in"]  # dup, empty, short, non-Latin
    assert raw["skipped"] == raw["rows_in"] - raw["rows_out"]
    pairs = pd.read_parquet(data_root / "prompts" / "pairs.parquet")
    assert set(pairs["shard"]) <= set(SHARDS.get_partition_keys())

    sharded = [a.key.to_user_string() for a in DATA_ASSETS if a.key.to_user_string() not in UNPARTITIONED]
    totals = {"synthetic": 0, "stage1": 0, "stage2": 0, "real": 0}
    for shard in SHARDS.get_partition_keys():
        result = _materialize(sharded, resources, run_config, partition_key=shard)
        for check in result.get_asset_check_evaluations():
            if check.severity == dg.AssetCheckSeverity.ERROR:
                assert check.passed, (shard, check.check_name, check.metadata)
        synthetic = _metadata(result, "synthetic_images")
        assert synthetic["rows_out"] == synthetic["rows_in"] == int((pairs["shard"] == shard).sum())
        assert len(synthetic["dvc_hash"]) == 32
        real = _metadata(result, "real_images")
        totals["real"] += real["rows_out"]
        totals["synthetic"] += synthetic["rows_out"]
        stage1 = _metadata(result, "multimodal_captions_stage1")
        assert 0.0 <= stage1["with_crop_fraction"] <= 1.0
        if stage1["rows_out"]:
            assert Path(stage1["preview_grid"]).is_file()
        totals["stage1"] += stage1["rows_out"]
        totals["stage2"] += _metadata(result, "multimodal_captions_stage2")["rows_out"]

    assert totals["synthetic"] == len(pairs)
    assert 0 < totals["real"] <= 6  # the corrupt file is skipped, never raised
    assert totals["stage1"] > 0
    records = [
        sample_prompt(sample, key)
        for shard in SHARDS.get_partition_keys()
        for key, sample in read_shard(data_root / "captions" / "stage1" / f"{shard}.tar")
    ]
    assert len(records) == totals["stage1"] and all(r.num_images <= 4 for r in records)
    assert any(r.num_images > 0 for r in records)

    # Re-running is idempotent: the same bytes, so the same DVC hash.
    before = dvc_hash(data_root)
    shard = SHARDS.get_partition_keys()[0]
    _materialize(UNPARTITIONED, resources, run_config)
    _materialize(sharded, resources, run_config, partition_key=shard)
    assert dvc_hash(data_root) == before


@pytest.mark.parametrize("profile", ["paper", "toy"])
def test_definitions_load_with_every_asset_and_check(profile):
    repository = build_definitions(profile).get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    assert keys == {
        "scorer_model", "vae_model", "raw_prompts", "content_style", "synthetic_images", "pickscore_scores", "filtered_synthetic",
        "real_images", "detections", "multimodal_captions_stage1", "multimodal_captions_stage2",
        "stage1_model", "stage2_model", "evaluation",
    }
    assert len(repository.asset_graph.asset_check_keys) == 9  # the data checks and the evaluation's targets
    assert {s.name for s in repository.schedule_defs} == {"weekly_prompts"}
    assert {s.name for s in repository.sensor_defs} >= {"new_source_files"}
