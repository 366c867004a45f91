import dagster as dg
import yaml

from mumu_assets.automation import new_source_files, source_fingerprint


def _params(tmp_path, prompts, real):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"num_shards": 2, "prompts": {"source": str(prompts)},
                                             "real_images": {"source": str(real)}}}))
    return path


def test_sensor_starts_runs_when_source_files_appear(tmp_path, monkeypatch):
    prompts, real = tmp_path / "prompts", tmp_path / "photos"
    prompts.mkdir()
    real.mkdir()
    (prompts / "a.txt").write_text("a man and his dog\n")
    monkeypatch.setenv("MUMU_PARAMS", str(_params(tmp_path, prompts, real)))

    first = dg.build_sensor_context()
    requests = list(new_source_files(first))
    assert [r.job_name for r in requests] == ["prompts_job"]  # the photo folder is still empty
    cursor = first.cursor

    assert list(new_source_files(dg.build_sensor_context(cursor=cursor))) == []  # nothing new

    (real / "p.jpg").write_bytes(b"x")
    (prompts / "b.txt").write_text("a cat\n")
    context = dg.build_sensor_context(cursor=cursor)
    requests = list(new_source_files(context))
    assert sorted(r.job_name for r in requests) == ["prompts_job", "real_images_job", "real_images_job"]
    assert {r.partition_key for r in requests if r.job_name == "real_images_job"} == {"00000", "00001"}


def test_fingerprint_changes_with_content(tmp_path):
    assert source_fingerprint(None) == "" and source_fingerprint(str(tmp_path / "missing")) == ""
    (tmp_path / "a.txt").write_text("1")
    before = source_fingerprint(str(tmp_path))
    (tmp_path / "a.txt").write_text("22")
    assert source_fingerprint(str(tmp_path)) != before
