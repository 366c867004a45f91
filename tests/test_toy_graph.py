"""The toy profile's whole graph, materialized in-process at smoke size through the same
function as `python -m mumu_assets.materialize --all`: every asset materializes, every check
passes, and the metadata says what each step did."""

import json
import math
import re
import tarfile
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from mumu_assets.definitions import build_definitions
from mumu_assets.materialize import all_assets, materialize
from mumu_assets.profiles.toy import toy_resources
from mumu_model.toy.suites import write_suite
from mumu_model.toy.world import PALETTE

REPO = Path(__file__).resolve().parent.parent


def _smoke_config(tmp_path: Path, data: Path) -> dict:
    runs = tmp_path / "runs"
    suites = [str(write_suite(tmp_path / "suites", kind, name=f"smoke_{kind}", count=4, seed=1))
              for kind in ("one", "two")]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training = [
        "max_steps=2", "batch_size=4", "warmup_steps=1", "checkpoint_every=2", "log_every=1",
        "validation_steps=2", "log_pipeline_artifact=false", f"tracking_uri={tracking}",
        f"model_overrides.vae={data / 'models' / 'vae'}",
    ]
    return {
        "raw_prompts": {"limit": 40},
        "content_style": {"styles_per_content": 1},
        "vae_model": {"steps": 3, "batch_size": 8},
        "scorer_model": {"steps": 3, "batch_size": 8},
        "stage1_model": {"output_root": str(runs), "overrides": training},
        "stage2_model": {"output_root": str(runs), "overrides": training},
        "evaluation": {"pipeline": str(runs / "stage2" / "pipeline"), "suites": suites, "steps": 2,
                       "seeds": [0], "text_only_ablation": True, "tracking_uri": tracking,
                       "targets": {}},  # two-step models are held to no targets
    }


def _latest(instance, name: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    assert records, f"{name} [{partition}] was not materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("toy")
    data = tmp_path / "data"
    defs = build_definitions("toy", resources=toy_resources(root=str(data)))
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        ok = materialize(defs, all_assets(defs), instance=instance, run_config=_smoke_config(tmp_path, data),
                         log=lines.append)
        assert ok, "\n".join(lines)
        yield defs, instance, data, tmp_path


def test_every_asset_materializes_and_every_check_passes(toy_run):
    defs, instance, _, _ = toy_run
    assert set(all_assets(defs)) == {
        "vae_model", "scorer_model", "raw_prompts", "content_style", "synthetic_images", "pickscore_scores",
        "filtered_synthetic", "real_images", "detections", "multimodal_captions_stage1",
        "multimodal_captions_stage2", "stage1_model", "stage2_model", "evaluation",
    }
    evaluated, failed = set(), []
    for check_key in defs.get_repository_def().asset_graph.asset_check_keys:
        for record in instance.event_log_storage.get_asset_check_execution_history(check_key, limit=10):
            evaluation = record.event.dagster_event.event_specific_data if record.event else None
            if isinstance(evaluation, dg.AssetCheckEvaluation):
                evaluated.add(check_key)
                if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                    failed.append((check_key.to_user_string(), evaluation.metadata))
    # Every check ran (so the loop above saw something to judge), and none failed.
    assert evaluated == set(defs.get_repository_def().asset_graph.asset_check_keys)
    assert not failed


def test_data_metadata_is_sane(toy_run):
    _, instance, data, _ = toy_run
    shards = ["00000", "00001"]
    synthetic = [_latest(instance, "synthetic_images", s) for s in shards]
    assert sum(m["rows_out"] for m in synthetic) == sum(m["rows_in"] for m in synthetic) > 0
    filtered = [_latest(instance, "filtered_synthetic", s) for s in shards]
    # The worst-scoring 10% of each shard go; the renderer's defects are counted against it.
    for meta in filtered:
        assert 0.8 <= meta["kept_fraction"] <= 0.95
    detections = [_latest(instance, "detections", s) for s in shards]
    assert sum(m["rows_out"] for m in detections) > 0
    stage1 = [_latest(instance, "multimodal_captions_stage1", s) for s in shards]
    assert sum(m["rows_out"] for m in stage1) > 0 and all(0 < m["with_crop_fraction"] <= 1 for m in stage1)
    stage2 = [_latest(instance, "multimodal_captions_stage2", s) for s in shards]
    assert sum(m["rows_out"] for m in stage2) > 0
    # Renders are PNG: JPEG would shift the colours the model must learn.
    assert list((data / "synthetic" / "images").glob("*.tar"))
    with tarfile.open(data / "captions" / "stage1" / "00000.tar") as tar:
        suffixes = {Path(name).suffix for name in tar.getnames()}
    assert ".png" in suffixes and ".jpg" not in suffixes


def _records(shard: Path) -> list[dict]:
    """Each record's JSON, with its key."""
    with tarfile.open(shard) as tar:
        return [{"key": m.name.split(".")[0], **json.loads(tar.extractfile(m).read())}
                for m in tar.getmembers() if m.name.endswith(".json")]


def test_toy_captions_have_the_held_out_prompts_form(toy_run):
    _, _, data, _ = toy_run
    # A crop stands for its object's colour: no colour word follows a crop (params.yaml).
    colour_after_crop = re.compile(r"<img:crop\d\.png> (?:small |big )?(?:%s)\b" % "|".join(PALETTE))
    stage1 = [r for shard in sorted((data / "captions" / "stage1").glob("*.tar")) for r in _records(shard)]
    assert any(r["num_crops"] for r in stage1)
    assert not [r["prompt"] for r in stage1 if colour_after_crop.search(r["prompt"])]
    assert any(set(c["phrase"].split()) & set(PALETTE) for r in stage1 for c in r["crops"])  # words were dropped
    # Stage 2 is images of one object, with its crop or text-only: the held-out prompts and their
    # ablation. (A caption may still name two: a render missing an object that the filter kept.)
    stage2 = [r for shard in sorted((data / "captions" / "stage2").glob("*.tar")) for r in _records(shard)]
    boxes = pd.concat([pd.read_parquet(shard) for shard in sorted((data / "detections").glob("*.parquet"))])
    objects = boxes.groupby("key")["start"].nunique()
    assert stage2 and all(objects[r["key"]] == 1 for r in stage2)
    assert (objects > 1).any()  # the images of several objects were there to be left out
    assert all(r["num_crops"] == (0 if r["text_only"] else 1) for r in stage2)


def test_pretrained_and_training_metadata(toy_run):
    _, instance, data, tmp_path = toy_run
    for name in ("vae_model", "scorer_model"):
        meta = _latest(instance, name)
        assert meta["rows_out"] > 0 and meta["dvc_hash"].endswith(".dir")  # a folder's DVC hash
    assert (data / "models" / "vae" / "config.json").is_file()
    assert not list((data / "models").rglob("*.bin")) and not list((data / "models").rglob("*.pt"))
    for stage in (1, 2):
        meta = _latest(instance, f"stage{stage}_model")
        assert meta["steps"] == 2 and math.isfinite(meta["final_loss"])
        assert (tmp_path / "runs" / f"stage{stage}" / "pipeline" / "model_index.json").is_file()


def test_evaluation_reports_the_probes_per_suite_with_intervals_and_ablations(toy_run):
    _, instance, _, _ = toy_run
    meta = _latest(instance, "evaluation")
    assert meta["errors"] == 0
    for suite in ("smoke_one", "smoke_two"):
        for name in ("colour_match", "colour_match_text_only", "all_colours", "obj_shape", "count_match"):
            assert 0.0 <= meta[f"{suite}/{name}"] <= 1.0, name
        assert meta[f"{suite}/colour_match_ci_low"] <= meta[f"{suite}/colour_match"] <= meta[f"{suite}/colour_match_ci_high"]
    assert meta["headline"].startswith("smoke_one: colour ") and "; smoke_two: all colours " in meta["headline"]
    assert Path(meta["grid"]).is_file() and Path(meta["samples"]).is_file()
