"""Raw text prompts, and the SDXL prompts built from them (paper §4, "synthetic data").

The paper writes each SDXL prompt as a *content* ("a man and a dog hiking in the wilderness
during the day") plus a *style* ("Abstract, geometric, modernist, ..."), pairing every content
with many styles so that the model learns to keep the two apart. This module does the table
work around that:

- `load_prompt_table` reads raw prompts (DiffusionDB or your own files) into a clean,
  deduplicated table with stable ids;
- `load_phrase_list` and `clip_interrogator_styles` give extra contents and styles;
- `pair_contents_with_styles` crosses contents with sampled styles, with a per-row seed so the
  SDXL synthesis is reproducible row by row.

Splitting prompts into content and style is in `mumu_model.data.content_style`.

Bad input never stops a run: every dropped or repaired item is counted by reason in a
`Skipped` report that the caller shows next to the result.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa

from mumu_model.data.report import Skipped

PROMPT_FILE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".txt")

# What `load_prompt_table("org/name")` downloads. DiffusionDB (`poloclub/diffusiondb`) has two
# metadata tables, metadata.parquet (2M rows) and metadata-large.parquet (14M rows); both match,
# and `limit` stops reading early. Point at a downloaded file to read only one.
HUB_ALLOW_PATTERNS = ["*.parquet"]

# Non-English heuristic: among the letters of a prompt, at least this share must be ASCII
# letters. It keeps English with a few accents ("café", "Moebius") and drops prompts mostly in
# CJK, Cyrillic, Arabic, ... It is a heuristic: French or German prompts mostly pass, and an
# English prompt quoting a long Japanese title may not.
MIN_ASCII_LETTER_SHARE = 0.8

# Rows read at once from a Parquet file: bounds memory on DiffusionDB's 14M-row table.
_PARQUET_BATCH_ROWS = 65_536

# Only real hub ids look like this; anything with a file suffix, a leading "." or "/", or more
# than one "/" is a local path, so a mistyped path is reported as missing, not downloaded.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

CLIP_INTERROGATOR_KINDS = ("mediums", "movements", "flavors", "artists")


class MissingColumnError(ValueError):
    """A prompt file has no column (or JSON field) with the requested name."""


def normalize_text(text: str) -> tuple[str, bool]:
    """Return `(clean, repaired)`: NFC, control characters removed, whitespace collapsed.

    Control characters (category Cc: tabs, newlines, NUL, ...) become spaces; format, private
    use and unassigned characters (Cf, Co, Cn, Cs: zero-width spaces, BOMs, ...) are removed.
    `repaired` tells whether any such character was there (tabs and newlines do not count,
    they are ordinary whitespace).
    """
    text = unicodedata.normalize("NFC", text)
    out = []
    repaired = False
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc":
            out.append(" ")
            repaired = repaired or not char.isspace()
        elif category.startswith("C"):
            repaired = True
        else:
            out.append(char)
    return " ".join("".join(out).split()), repaired


def dedup_key(text: str) -> str:
    """Key under which two prompts count as the same: case-insensitive, whitespace-collapsed."""
    return " ".join(text.casefold().split())


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha256 of its `dedup_key`.

    Hashing the key (not the text) means prompts that deduplicate together share one id.
    """
    return hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()[:16]


def ascii_letter_share(text: str) -> float | None:
    """Share of ASCII letters among all letters of `text`; None when it has no letters."""
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return None
    return sum(char.isascii() for char in letters) / len(letters)


# ---------------------------------------------------------------------------------------------
# Reading prompt files


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(PROMPT_FILE_SUFFIXES)


def _resolve_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        if not _is_hub_id(source):
            raise FileNotFoundError(
                f"prompt source {source!r} is neither an existing file or folder nor a hub "
                "dataset id of the form 'org/name'"
            )
        # Imported here: only users who read from the hub need the network client.
        import huggingface_hub

        path = Path(
            huggingface_hub.snapshot_download(
                source, repo_type="dataset", allow_patterns=HUB_ALLOW_PATTERNS
            )
        )
    if path.is_file():
        if path.suffix.lower() not in PROMPT_FILE_SUFFIXES:
            raise ValueError(f"{path}: unsupported prompt file type; use one of {PROMPT_FILE_SUFFIXES}")
        return [path]
    files = sorted(
        (
            file
            for file in path.rglob("*")
            if file.suffix.lower() in PROMPT_FILE_SUFFIXES
            and file.is_file()
            # Hidden files and folders (.cache, .git, editor temp files) are not data.
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        ),
        key=lambda file: file.relative_to(path).as_posix(),
    )
    if not files:
        raise ValueError(f"{path}: folder has no prompt files ({', '.join(PROMPT_FILE_SUFFIXES)})")
    return files


def _read_parquet(path: Path, column: str) -> Iterator[object]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        names = parquet.schema_arrow.names
        if column not in names:
            raise MissingColumnError(f"{path}: no column {column!r}; it has columns {names}")
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
            yield from batch.column(0).to_pylist()


def _read_csv(path: Path, column: str, skipped: Skipped) -> Iterator[object]:
    # Strict UTF-8: a CSV that does not decode is corrupt, and the caller skips it whole (or
    # from the failing line on) instead of feeding mojibake on.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            skipped.add("empty_file", str(path))
            return
        if column not in header:
            raise MissingColumnError(f"{path}: no column {column!r}; it has columns {header}")
        index = header.index(column)
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(header):
                skipped.add("bad_csv_line", f"{path.name}:{reader.line_num}",
                            f"expected {len(header)} fields, saw {len(row)}")
                continue
            yield row[index]


def _read_jsonl(path: Path, column: str, skipped: Skipped) -> Iterator[object]:
    seen_keys: set[str] = set()
    found = False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                skipped.add("bad_json_line", f"{path.name}:{line_number}", str(err))
                continue
            if not isinstance(record, dict):
                skipped.add("bad_json_line", f"{path.name}:{line_number}", "not a JSON object")
                continue
            if column not in record:
                seen_keys.update(record)
                skipped.add("missing_field", f"{path.name}:{line_number}")
                continue
            found = True
            yield record[column]
    if not found and seen_keys:
        # Not one record had the field: the column name is wrong, not the data.
        raise MissingColumnError(f"{path}: no field {column!r}; its records have fields {sorted(seen_keys)}")


def _read_txt(path: Path) -> Iterator[object]:
    # Line-oriented text: repair bad bytes (U+FFFD) instead of losing the rest of the file.
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            yield line


def _read_file(path: Path, column: str, skipped: Skipped) -> Iterator[object]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, column)
    if suffix == ".csv":
        return _read_csv(path, column, skipped)
    if suffix == ".jsonl":
        return _read_jsonl(path, column, skipped)
    return _read_txt(path)


def _clean_prompt(value: object, item_id: str, min_chars: int, max_chars: int,
                  skipped: Skipped) -> str | None:
    """The cleaned prompt, or None after counting why it was dropped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        skipped.add("not_text", item_id, "missing value")
        return None
    if not isinstance(value, str):
        skipped.add("not_text", item_id, f"{type(value).__name__}: {str(value)[:40]}")
        return None
    text, repaired = normalize_text(value)
    if repaired:
        skipped.add("stripped_control_chars", item_id, text[:60])
    if not text:
        skipped.add("empty", item_id)
        return None
    if len(text) < min_chars:
        skipped.add("too_short", item_id, text)
        return None
    if len(text) > max_chars:
        skipped.add("too_long", item_id, f"{len(text)} chars: {text[:40]}...")
        return None
    share = ascii_letter_share(text)
    if share is None:
        skipped.add("no_letters", item_id, text[:60])
        return None
    if share < MIN_ASCII_LETTER_SHARE:
        skipped.add("non_latin", item_id, text[:60])
        return None
    return text


def load_prompt_table(
    source: str,
    *,
    text_column: str = "prompt",
    min_chars: int = 8,
    max_chars: int = 500,
    limit: int | None = None,
) -> tuple[pd.DataFrame, Skipped]:
    """Read raw prompts into a clean, deduplicated table with columns `prompt_id`, `prompt`.

    Args:
        source: a `.parquet`, `.csv`, `.jsonl` or `.txt` (one prompt per line) file; a folder
            of such files (read recursively in sorted path order, hidden files ignored); or a
            hub dataset id `org/name` such as `poloclub/diffusiondb`, whose `*.parquet` files
            are downloaded with `huggingface_hub.snapshot_download` (needs network).
        text_column: the column (CSV, Parquet) or field (JSONL) holding the prompt; ignored for
            `.txt`.
        min_chars, max_chars: bounds on the cleaned prompt's length.
        limit: stop after this many kept prompts (reading stops early too).

    Cleaning: NFC, control characters stripped, whitespace collapsed. Dropped, each counted
    under its reason: missing or non-string values (`not_text`), `empty`, `too_short`,
    `too_long`, prompts without letters (`no_letters`), mostly non-Latin prompts
    (`non_latin`, a heuristic: fewer than 80% of the letters are ASCII, see
    `MIN_ASCII_LETTER_SHARE`), and repeats of an earlier prompt (`duplicate`, compared
    case-insensitively). Control characters are stripped (`stripped_control_chars`, a repair).
    Bad lines are skipped (`bad_csv_line`, `bad_json_line`, JSONL records without the field:
    `missing_field`), and so are empty CSV files (`empty_file`). A file that cannot be read is
    counted as `unreadable_file` and the other files are still read (rows read before a
    failure part-way through a file are kept). `.txt` and `.jsonl` bytes that are not UTF-8
    become U+FFFD; a `.csv` that is not UTF-8 is unreadable from that line on.

    `prompt_id` is `prompt_id(prompt)`: stable across runs and sources. The first occurrence
    of a prompt is the one kept, so the order follows the files.

    Raises:
        FileNotFoundError: `source` does not exist and is not an `org/name` hub id.
        MissingColumnError (a ValueError): a file lacks `text_column`; names the file and the
            columns it has.
        ValueError: no file of the source could be read at all.
    """
    skipped = Skipped()
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    files = _resolve_files(str(source))
    unreadable = 0
    for path in files:
        if limit is not None and len(rows) >= limit:
            break
        try:
            for row_number, value in enumerate(_read_file(path, text_column, skipped)):
                item_id = f"{path.name}:{row_number}"
                text = _clean_prompt(value, item_id, min_chars, max_chars, skipped)
                if text is None:
                    continue
                key = dedup_key(text)
                if key in seen:
                    skipped.add("duplicate", item_id, text[:60])
                    continue
                seen.add(key)
                rows.append((prompt_id(text), text))
                if limit is not None and len(rows) >= limit:
                    break
        except MissingColumnError:
            raise
        except (OSError, ValueError, csv.Error, pa.ArrowException) as err:
            # Corrupt Parquet, undecodable CSV, I/O errors: one bad file must not cost the rest
            # of the folder. (pyarrow's errors derive from these too.)
            unreadable += 1
            skipped.add("unreadable_file", str(path), f"{type(err).__name__}: {str(err)[:200]}")
    if unreadable and unreadable == len(files) and not rows:
        raise ValueError(f"no readable prompt file in {source!r}: {skipped.examples['unreadable_file']}")
    table = pd.DataFrame(rows, columns=["prompt_id", "prompt"], dtype=object)
    return table, skipped


# ---------------------------------------------------------------------------------------------
# Extra contents and styles


def _clean_phrases(lines: Iterable[str], *, comments: bool = True) -> list[str]:
    """Whitespace-collapsed, non-empty, case-insensitively unique phrases, first kept."""
    phrases: list[str] = []
    seen: set[str] = set()
    for line in lines:
        phrase = " ".join(str(line).split())
        if not phrase or (comments and phrase.startswith("#")):
            continue
        key = dedup_key(phrase)
        if key not in seen:
            seen.add(key)
            phrases.append(phrase)
    return phrases


def load_phrase_list(path: str | os.PathLike) -> list[str]:
    """Read a list of contents or styles: one phrase per line.

    Lines are stripped and whitespace-collapsed; blank lines and lines starting with `#` are
    ignored; repeats (case-insensitive) keep their first occurrence. Bad bytes become U+FFFD.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"phrase list {path} does not exist or is not a file")
    return _clean_phrases(path.read_text(encoding="utf-8", errors="replace").splitlines())


def _clip_interrogator_data_file(name: str) -> Path:
    # Found through the distribution's file list or on sys.path, never by importing
    # clip_interrogator: its import pulls torch models and open_clip, and we only want text.
    relative = f"clip_interrogator/data/{name}"
    try:
        distribution = importlib.metadata.distribution("clip-interrogator")
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        for file in distribution.files or []:
            if file.as_posix() == relative:
                path = Path(distribution.locate_file(file))
                if path.is_file():
                    return path
    for entry in sys.path:
        path = Path(entry or ".") / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{relative} not found: install the phrase lists with `pip install --no-deps clip-interrogator`"
    )


def clip_interrogator_styles(kind: str = "mediums") -> list[str]:
    """Style phrases from the lists shipped in the `clip-interrogator` package (MIT).

    `kind` is one of "mediums" ("a watercolor painting", 95 lines), "movements" ("art deco",
    200), "flavors" ("highly detailed", ~100k) or "artists" (~5k names, returned as
    "by {artist}"). The package is read as data and never imported.
    """
    if kind not in CLIP_INTERROGATOR_KINDS:
        raise ValueError(f"kind must be one of {CLIP_INTERROGATOR_KINDS}, not {kind!r}")
    path = _clip_interrogator_data_file(f"{kind}.txt")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if kind == "artists":
        lines = [f"by {line.strip()}" for line in lines if line.strip()]
    return _clean_phrases(lines)


# ---------------------------------------------------------------------------------------------
# Content x style pairs


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pair_id(content: str, style: str) -> str:
    """Stable id of a (content, style) pair: 16 hex digits of sha256 over both."""
    # A separator that cannot occur in cleaned text, so ("a b", "c") != ("a", "b c").
    return _sha256_hex(f"{content}\x1f{style}")[:16]


def row_seed(seed: int, pair: str) -> int:
    """Per-row generation seed from the run seed and the pair id; fits any RNG (< 2**31)."""
    return int(_sha256_hex(f"{seed}:{pair}")[:8], 16) & 0x7FFF_FFFF


def pair_contents_with_styles(contents: list[str], styles: list[str], k: int, seed: int) -> pd.DataFrame:
    """Pair every content with `k` distinct styles, for SDXL prompt synthesis (paper §4).

    Contents and styles are whitespace-collapsed and deduplicated (case-insensitive, first kept);
    empty contents are dropped. An empty style is allowed and means "content only"; with no
    styles at all every content gets that one empty style. Each content draws `k` styles
    without replacement (all of them when there are fewer than `k`).

    The draw for a content depends only on `seed`, the content and the set of styles, not on
    the order of the lists or on the other contents, so adding contents does not reshuffle the
    existing pairs.

    Returns a DataFrame with columns `pair_id`, `content`, `style`, `text` (`"{content},
    {style}"`, or the content alone when the style is empty) and `seed` (a per-row int from
    `row_seed(seed, pair_id)`: generate row i with `torch.Generator().manual_seed(seed_i)` and
    it comes out the same on its own or in any batch).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    unique_contents = _clean_phrases(contents, comments=False)
    style_keys: dict[str, str] = {}
    for style in styles:
        phrase = " ".join(str(style).split())
        style_keys.setdefault(dedup_key(phrase), phrase)
    # Sorted, so the draw does not depend on the order the style lists were concatenated in.
    pool = [style_keys[key] for key in sorted(style_keys)] or [""]
    rows = []
    for content in unique_contents:
        rng = random.Random(_sha256_hex(f"{seed}:{dedup_key(content)}"))
        for style in rng.sample(pool, min(k, len(pool))):
            pid = pair_id(content, style)
            text = f"{content}, {style}" if style else content
            rows.append((pid, content, style, text, row_seed(seed, pid)))
    table = pd.DataFrame(rows, columns=["pair_id", "content", "style", "text", "seed"])
    return table.astype({"seed": "int64"})
