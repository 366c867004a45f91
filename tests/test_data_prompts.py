"""Raw prompt tables, phrase lists and content x style pairing (mumu_model.data.prompts)."""

import hashlib
import json

import pandas as pd
import pytest

from mumu_model.data import prompts as prompts_module
from mumu_model.data.prompts import (
    MissingColumnError,
    clip_interrogator_styles,
    load_phrase_list,
    load_prompt_table,
    pair_contents_with_styles,
    prompt_id,
)

GOOD = [
    "a castle on a hill at sunset, oil painting",
    "portrait of a cyberpunk girl, digital art, 8k",
    "a cat sitting on a windowsill in the rain",
]


def write_parquet(path, values, column="prompt"):
    pd.DataFrame({column: values, "seed": range(len(values))}).to_parquet(path)
    return path


def test_parquet_is_cleaned_deduplicated_and_every_drop_is_counted(tmp_path):
    values = GOOD + [
        "  A castle on a hill   at sunset, OIL painting ",  # duplicate: case and whitespace
        None,  # not text
        "short",  # too short
        "x" * 501,  # too long
        "   ",  # empty
        "一只猫坐在窗台上，水彩画风格",  # non-Latin
        "Кошка сидит на подоконнике, акварель",  # non-Latin
        "12345678 90",  # no letters
        "a dog\x00 in a\u200b park\tat noon",  # control characters stripped, then kept
        "un café à Paris, peinture à l'huile",  # accented Latin passes the heuristic
    ]
    table, skipped = load_prompt_table(str(write_parquet(tmp_path / "p.parquet", values)))

    assert list(table.columns) == ["prompt_id", "prompt"]
    assert list(table["prompt"]) == GOOD + ["a dog in a park at noon", "un café à Paris, peinture à l'huile"]
    counts = skipped.counts
    assert counts["duplicate"] == 1
    assert counts["not_text"] == 1
    assert counts["too_short"] == 1 and counts["too_long"] == 1 and counts["empty"] == 1
    assert counts["non_latin"] == 2 and counts["no_letters"] == 1
    assert counts["stripped_control_chars"] == 1
    assert skipped.examples["duplicate"][0].startswith("p.parquet:3")
    # Stable ids: sha256 of the case-insensitive, whitespace-collapsed text.
    expected = hashlib.sha256(GOOD[0].casefold().encode()).hexdigest()[:16]
    assert table["prompt_id"][0] == expected == prompt_id("A  castle on a hill at sunset, OIL painting")
    assert table["prompt_id"].is_unique


def test_csv_jsonl_and_txt_sources(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,prompt\n1,"a red fox in the snow, watercolor"\n2,a,b,extra\n3,\n4,a blue bird on a branch\n')
    table, skipped = load_prompt_table(str(csv_path))
    assert list(table["prompt"]) == ["a red fox in the snow, watercolor", "a blue bird on a branch"]
    assert skipped.counts["bad_csv_line"] == 1 and skipped.counts["empty"] == 1

    jsonl = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"text": "a lighthouse in a storm"}),
        json.dumps({"text": 12345}),  # a number, not text
        json.dumps({"text": ["a", "list"]}),
        json.dumps({"other": "no text field"}),
        "{not json",
        json.dumps(["not", "an", "object"]),
        "",
    ]
    jsonl.write_text("\n".join(lines))
    table, skipped = load_prompt_table(str(jsonl), text_column="text")
    assert list(table["prompt"]) == ["a lighthouse in a storm"]
    assert skipped.counts["not_text"] == 2
    assert skipped.counts["missing_field"] == 1 and skipped.counts["bad_json_line"] == 2

    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a horse on a beach\n\na horse on a beach\nbad \xff byte in a prompt\n")
    table, skipped = load_prompt_table(str(txt))
    assert list(table["prompt"]) == ["a horse on a beach", "bad \ufffd byte in a prompt"]
    assert skipped.counts["empty"] == 1 and skipped.counts["duplicate"] == 1


def test_folder_is_read_in_order_and_a_corrupt_file_is_skipped_not_fatal(tmp_path):
    write_parquet(tmp_path / "b.parquet", [GOOD[1], GOOD[0]])
    (tmp_path / "a.csv").write_text(f'prompt\n"{GOOD[0]}"\n')
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet at all")
    (tmp_path / "d.csv").write_bytes(b"prompt\n\xff\xfe\x00garbage\n")  # not UTF-8
    (tmp_path / "e.csv").write_text("")  # empty: nothing to read, not an error
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.txt").write_text(GOOD[2] + "\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("a hidden file that is not data\n")
    (tmp_path / "notes.md").write_text("ignored: not a prompt file type\n")

    table, skipped = load_prompt_table(str(tmp_path))
    assert list(table["prompt"]) == [GOOD[0], GOOD[1], GOOD[2]]  # a.csv, b.parquet, sub/e.txt
    assert skipped.counts["unreadable_file"] == 2
    assert skipped.counts["duplicate"] == 1 and skipped.counts["empty_file"] == 1
    assert any("c.parquet" in example for example in skipped.examples["unreadable_file"])

    again, _ = load_prompt_table(str(tmp_path))
    pd.testing.assert_frame_equal(table, again)


def test_limit_stops_early(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"prompt number {i} of a dog" for i in range(50)])
    write_parquet(tmp_path / "b.parquet", ["never read, the limit is reached before this file"])
    table, _ = load_prompt_table(str(tmp_path), limit=7)
    assert list(table["prompt"]) == [f"prompt number {i} of a dog" for i in range(7)]


def test_missing_column_names_the_file_and_its_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", GOOD, column="caption")
    with pytest.raises(MissingColumnError, match=r"p\.parquet.*'prompt'.*\['caption', 'seed'\]"):
        load_prompt_table(str(path))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("caption,seed\na dog,1\n")
    with pytest.raises(ValueError, match=r"p\.csv.*\['caption', 'seed'\]"):
        load_prompt_table(str(csv_path))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"caption": "a dog in a park"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl.*caption"):
        load_prompt_table(str(jsonl))


def test_missing_local_path_is_a_clear_error_not_a_download(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a local path must never be looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    for source in [str(tmp_path / "missing.parquet"), "data/prompts.csv", "./nope", "a/b/c"]:
        with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a hub"):
            load_prompt_table(source)


def test_hub_id_is_downloaded_as_a_dataset_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    write_parquet(snapshot / "metadata.parquet", GOOD)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    table, _ = load_prompt_table("poloclub/diffusiondb")
    assert calls == [("poloclub/diffusiondb", {"repo_type": "dataset", "allow_patterns": ["*.parquet"]})]
    assert list(table["prompt"]) == GOOD


def test_all_files_unreadable_raises(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable prompt file"):
        load_prompt_table(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no prompt files"):
        load_prompt_table(str(empty))


def test_pairs_are_seeded_distinct_and_stable():
    contents = ["a man and a dog hiking", "a red car", "A red  car", ""]
    styles = ["oil painting", "pixel art", "Oil Painting", "by Claude Monet", "art deco", ""]
    table = pair_contents_with_styles(contents, styles, k=3, seed=0)

    assert list(table.columns) == ["pair_id", "content", "style", "text", "seed"]
    assert list(table["content"].unique()) == ["a man and a dog hiking", "a red car"]
    assert len(table) == 6
    for _, group in table.groupby("content"):
        assert group["style"].is_unique
    assert table["pair_id"].is_unique
    assert table["seed"].dtype == "int64" and table["seed"].between(0, 2**31 - 1).all()
    for row in table.itertuples():
        assert row.text == (f"{row.content}, {row.style}" if row.style else row.content)

    pd.testing.assert_frame_equal(table, pair_contents_with_styles(contents, styles, k=3, seed=0))
    # The draw for a content depends on (seed, content, set of styles) only.
    reordered = ["", "art deco", "by Claude Monet", "pixel art", "oil painting"]
    shuffled = pair_contents_with_styles(["a red car"], reordered, k=3, seed=0)
    pd.testing.assert_frame_equal(shuffled, table[table["content"] == "a red car"].reset_index(drop=True))
    other_seed = pair_contents_with_styles(contents, styles, k=3, seed=1)
    assert list(other_seed["seed"]) != list(table["seed"])


def test_pairs_with_few_or_no_styles():
    table = pair_contents_with_styles(["a red car"], ["pixel art", "watercolor"], k=10, seed=0)
    assert sorted(table["style"]) == ["pixel art", "watercolor"]
    bare = pair_contents_with_styles(["a red car"], [], k=3, seed=0)
    assert list(bare["text"]) == ["a red car"] and list(bare["style"]) == [""]
    with pytest.raises(ValueError, match="k must be"):
        pair_contents_with_styles(["a red car"], ["x"], k=0, seed=0)


def test_phrase_list(tmp_path):
    path = tmp_path / "styles.txt"
    path.write_text("# styles I like\noil painting\n\n  pixel   art \nOil Painting\n#comment\nby Claude Monet\n")
    assert load_phrase_list(path) == ["oil painting", "pixel art", "by Claude Monet"]
    with pytest.raises(FileNotFoundError):
        load_phrase_list(tmp_path / "missing.txt")


def test_clip_interrogator_styles_are_read_without_importing_the_package():
    import sys

    mediums = clip_interrogator_styles("mediums")  # the Makefile installs the package --no-deps
    assert "clip_interrogator" not in sys.modules
    assert len(mediums) > 50 and "a watercolor painting" in mediums
    artists = clip_interrogator_styles("artists")
    assert len(artists) > 1000 and all(phrase.startswith("by ") for phrase in artists)
    assert "abstract art" in clip_interrogator_styles("movements")
    with pytest.raises(ValueError, match="kind must be one of"):
        clip_interrogator_styles("negative")


def test_clip_interrogator_missing_is_a_clear_error(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(prompts_module.importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(prompts_module.sys, "path", [])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps clip-interrogator"):
        clip_interrogator_styles("mediums")
