"""Blocking checks on the toy graph's own assets: a failed ERROR check stops what is downstream,
inside its run (Dagster fails the step) and in the runs after it (`materialize` refuses)."""

import io
import json
import tarfile
from pathlib import Path

import dagster as dg
import pytest

from mumu_assets.definitions import build_definitions
from mumu_assets.materialize import failed_upstream_checks, materialize
from mumu_assets.profiles.toy import toy_resources
from mumu_model.data import steps

SHARD = "00000"
# Everything stage-1 captions read, one shard of it, at smoke size.
UPSTREAM = ["raw_prompts", "content_style", "synthetic_images", "scorer_model", "pickscore_scores",
            "filtered_synthetic", "real_images", "detections"]
CONFIG = {"raw_prompts": {"limit": 40}, "content_style": {"styles_per_content": 1},
          "scorer_model": {"steps": 3, "batch_size": 8}}
# An image tag left open: the record no longer parses as a multimodal prompt.
BROKEN_PROMPT = "a <img:crop0.png circle"


def _break_first_record(shard: Path) -> None:
    """Rewrite a caption shard with its first record's prompt unparsable (a writer's bug)."""
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    first = next(i for i, (member, _) in enumerate(members) if member.name.endswith(".json"))
    member, data = members[first]
    members[first] = (member, json.dumps({**json.loads(data), "prompt": BROKEN_PROMPT}).encode())
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


@pytest.fixture
def broken_stage1_captions(monkeypatch):
    """Stage-1 captions whose shard is corrupted once written, before the asset's check reads it."""
    caption = steps.caption

    def corrupting(stage, sources, detections, out, **kwargs):
        result = caption(stage, sources, detections, out, **kwargs)
        if stage == 1:
            _break_first_record(out)
        return result

    monkeypatch.setattr(steps, "caption", corrupting)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """The toy graph's definitions and instance with one shard materialized up to detections."""
    data = tmp_path_factory.mktemp("blocking") / "data"
    defs = build_definitions("toy", resources=toy_resources(root=str(data)))
    lines: list[str] = []
    with dg.instance_for_test() as instance:
        assert materialize(defs, UPSTREAM, instance=instance, partition=SHARD, run_config=CONFIG,
                           log=lines.append), "\n".join(lines)
        yield defs, instance


def _materializations(instance, name: str) -> list:
    return instance.fetch_materializations(dg.AssetKey(name), limit=10).records


def test_a_failed_check_stops_the_downstream_asset_in_its_run(shard, broken_stage1_captions):
    defs, instance = shard
    result = dg.materialize(defs.assets, selection=["multimodal_captions_stage1", "stage1_model"],
                            resources=defs.resources, partition_key=SHARD, instance=instance, raise_on_error=False)
    assert not result.success
    assert result.get_failed_step_keys() == {"multimodal_captions_stage1"}
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "records_parse"]
    assert not check.passed and check.blocking and check.severity == dg.AssetCheckSeverity.ERROR
    # The captions were written (and their check judged them); the training never started.
    assert [e.asset_key for e in result.get_asset_materialization_events()] == [
        dg.AssetKey("multimodal_captions_stage1")]
    assert not _materializations(instance, "stage1_model")


def test_materialize_stops_at_the_failed_check_and_refuses_what_is_downstream(shard, broken_stage1_captions):
    defs, instance = shard
    lines: list[str] = []
    assert not materialize(defs, ["multimodal_captions_stage1", "stage1_model"], instance=instance,
                           partition=SHARD, log=lines.append)
    assert len(lines) == 1 and "multimodal_captions_stage1 [00000] failed its check records_parse" in lines[0]

    # A later run of the downstream asset alone is refused before any run starts.
    runs = len(instance.get_run_records())
    lines.clear()
    assert not materialize(defs, ["stage1_model"], instance=instance, log=lines.append)
    assert lines == [line for line in lines if line.startswith("materialize: stage1_model not run: upstream ")]
    assert len(lines) == 1
    assert "multimodal_captions_stage1 [00000] failed its check records_parse" in lines[0]
    assert len(instance.get_run_records()) == runs
    assert not _materializations(instance, "stage1_model")
    [failed] = failed_upstream_checks(defs, instance, "stage1_model")
    assert (failed.asset, failed.partition, failed.check) == ("multimodal_captions_stage1", SHARD, "records_parse")


def test_a_good_materialization_lifts_the_block(shard, broken_stage1_captions, monkeypatch):
    defs, instance = shard
    lines: list[str] = []
    assert not materialize(defs, ["multimodal_captions_stage1"], instance=instance, partition=SHARD, log=lines.append)
    assert failed_upstream_checks(defs, instance, "stage1_model")
    # The same shard rebuilt by an unbroken writer: its check passes, and judged the newer data.
    monkeypatch.undo()
    assert materialize(defs, ["multimodal_captions_stage1"], instance=instance, partition=SHARD, log=lines.append)
    assert failed_upstream_checks(defs, instance, "stage1_model") == []
    print("\n".join(lines))
