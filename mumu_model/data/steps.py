"""One function per dataset step, file in -> file out, each returning what it skipped.

The Dagster assets (mumu_assets) and anyone scripting the data pipeline call these; all the
model work lives in the backends passed in, all storage in `shards`.

Faults stay small. Each step first removes the temps that killed writers left in its output
folder (`remove_orphans`). A row that raises is dropped and reported with its key and error
(`StepResult.failed`, and `row_error` in `skipped`), and the good rows are written; only when
more than `MAX_FAILED_FRACTION` of a shard's rows raise, which is a broken backend or a bug
rather than bad data, does the step raise `ShardFailed`, listing them, and write nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from ..atomic import remove_orphans
from ..images import ImageLoadError
from .report import Skipped
from .shards import (
    ShardError, check_key, decode_image, encode_image, json_bytes, read_shard, sample_json, write_shard,
    write_table,
)

# Above this fraction of a shard's rows raising, the shard fails instead of being written short.
MAX_FAILED_FRACTION = 0.5


def shard_of(item_id: str, num_shards: int) -> int:
    """Stable shard assignment: the same item lands in the same shard on every machine."""
    digest = hashlib.sha256(item_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def rng_for(key: str, seed: int, purpose: str) -> random.Random:
    """A generator that depends only on the record, so re-runs and re-shardings agree."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class ShardFailed(RuntimeError):
    """Too many rows of one shard raised; the shard was not written (a previous version stays).
    `failed` holds (key, error) of every row that raised, `attempted` the rows tried."""

    def __init__(self, out: Path, failed: list[tuple[str, str]], attempted: int, shown: int = 10):
        self.out, self.failed, self.attempted = Path(out), list(failed), attempted
        rows = "; ".join(f"{key}: {error}" for key, error in failed[:shown])
        more = f"; and {len(failed) - shown} more" if len(failed) > shown else ""
        super().__init__(
            f"{out}: {len(failed)} of {attempted} rows raised (more than {MAX_FAILED_FRACTION:.0%}), "
            f"so the shard was not written: {rows}{more}"
        )


@dataclass
class StepResult:
    rows: int
    skipped: Skipped = field(default_factory=Skipped)
    table: pd.DataFrame | None = None
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, "Error: message") of rows that raised
    orphans_removed: list[str] = field(default_factory=list)  # names of killed writers' temps deleted
    attempted: int = 0  # rows that reached the step's own per-row work (failed ones included)

    def row_failed(self, key: str, err: BaseException) -> None:
        error = f"{type(err).__name__}: {err}"
        self.failed.append((key, error))
        self.skipped.add("row_error", key, error)

    def check_failures(self, out: Path) -> None:
        """Raise ShardFailed if more than MAX_FAILED_FRACTION of the attempted rows raised."""
        if self.failed and len(self.failed) > MAX_FAILED_FRACTION * self.attempted:
            raise ShardFailed(out, self.failed, self.attempted)


def _start(out: Path) -> StepResult:
    """A step's result, after deleting the temps that killed writers left beside `out`."""
    return StepResult(rows=0, orphans_removed=[path.name for path in remove_orphans(out.parent)])


class _Keys:
    """Refuses, as a row error, a key that cannot name a sample or that repeats an earlier one
    (write_shard would fail the whole shard on it)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def check(self, key: str) -> None:
        check_key(key)
        if key in self.seen:
            raise ShardError(f"duplicate sample key {key!r}")
        self.seen.add(key)


def iter_images(shard: Path, skipped: Skipped, keys: set[str] | None = None) -> Iterator[tuple[str, Image.Image, dict]]:
    """(key, target image, json meta) of a shard's samples; unreadable samples are counted."""
    for key, sample in read_shard(shard, skipped):
        if keys is not None and key not in keys:
            continue
        try:
            meta = sample_json(sample, key)
            field_name = next((f for f in ("jpg", "png") if f in sample), None)
            if field_name is None:
                raise ShardError(f"sample {key!r} has no jpg/png image")
            yield key, decode_image(sample[field_name], f"{key}.{field_name}"), meta
        except (ShardError, ImageLoadError) as err:
            skipped.add("unreadable_sample", key, str(err))


IMAGE_FORMATS = ("jpg", "png")


def _image_format(image_format: str) -> str:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return image_format


def synthesize(pairs: pd.DataFrame, synthesizer, out: Path, image_format: str = "jpg") -> StepResult:
    """Text-to-image for each (content, style) pair; one image per pair, seeded by its row.

    A synthesizer that knows what it drew (the toy renderer) adds `row["annotations"]` (boxes,
    deliberate defects); they are kept in the sample's JSON and, as JSON text, in the manifest.
    `image_format`: "jpg" for photographs; "png" where JPEG's chroma subsampling would change
    the colours being learned (32 px renders).
    """
    image_format = _image_format(image_format)
    result = _start(out)
    manifest = []
    keys = _Keys()

    def samples() -> Iterable[tuple[str, dict]]:
        for row, image in synthesizer.generate(pairs.to_dict("records"), skipped=result.skipped):
            result.attempted += 1
            key = str(row.get("pair_id", "?"))
            try:
                keys.check(key)
                meta = {k: row[k] for k in ("pair_id", "content", "style", "text", "seed")}
                meta.update(source="synthetic", width=image.width, height=image.height)
                if row.get("annotations") is not None:
                    meta["annotations"] = row["annotations"]
                fields = {image_format: encode_image(image, image_format), "json": json_bytes(meta)}
                entry = {**meta, "annotations": json.dumps(meta["annotations"]) if "annotations" in meta else None}
            except Exception as err:  # noqa: BLE001 - one bad row costs only itself (check_failures bounds it)
                result.row_failed(key, err)
                continue
            manifest.append(entry)
            yield key, fields
        result.check_failures(out)  # raised inside write_shard: no shard is written

    write_shard(out, samples())
    result.rows = len(manifest)
    result.table = pd.DataFrame(
        manifest, columns=["pair_id", "content", "style", "text", "seed", "source", "width", "height", "annotations"]
    )
    write_table(result.table, out.with_suffix(".parquet"))
    return result


def score(shard: Path, scorer, out: Path, batch_size: int = 16) -> StepResult:
    """PickScore of every synthetic image against its own prompt text.

    The scorer gives NaN to a pair it cannot score and names it (by key) in `skipped`; a batch
    that raises is retried row by row, so one bad row costs only itself."""
    result = _start(out)
    rows: list[dict] = []
    batch: list[tuple[str, Image.Image, dict]] = []

    def score_batch(items: list[tuple[str, Image.Image, dict]]) -> None:
        skipped = Skipped()  # merged only if the batch succeeds, so a retried row is counted once
        try:
            scores = scorer.score([m.get("text") for _, _, m in items], [image for _, image, _ in items],
                                  ids=[k for k, _, _ in items], skipped=skipped)
            scored = [{"key": k, "text": m.get("text"), "score": float(s), "defect": _defect(m)}
                      for (k, _, m), s in zip(items, scores, strict=True)]
        except Exception as err:  # noqa: BLE001 - retried per row, then counted
            if len(items) == 1:
                result.row_failed(items[0][0], err)
                return
            for item in items:
                score_batch([item])
            return
        result.skipped.update(skipped)
        rows.extend(scored)

    def flush() -> None:
        if batch:
            result.attempted += len(batch)
            score_batch(list(batch))
            batch.clear()

    for item in iter_images(shard, result.skipped):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    flush()
    result.check_failures(out)
    result.rows = len(rows)
    result.table = pd.DataFrame(rows, columns=["key", "text", "score", "defect"])
    write_table(result.table, out)
    return result


def _defect(meta: dict) -> str | None:
    """The deliberate defect a renderer put in this image (None: none, or not known)."""
    annotations = meta.get("annotations")
    return annotations.get("defect") if isinstance(annotations, dict) else None


def filter_scores(
    scores: pd.DataFrame, min_score: float, out: Path, min_quantile: float = 0.0
) -> tuple[pd.DataFrame, dict]:
    """Keep the synthetic images at or above `min_score` (and `min_quantile`); the kept keys
    are the output."""
    from .scoring import filter_by_score

    remove_orphans(out.parent)
    kept, stats = filter_by_score(scores, min_score, min_quantile)
    write_table(kept, out)
    return kept, stats


def ingest_real(items: Iterable[tuple], out: Path, **ingest_kwargs) -> StepResult:
    """Filter, crop on the person, and caption real photos into a shard (key = image id hash)."""
    from .real_images import ingest_real_images

    result = _start(out)
    manifest = []
    keys = _Keys()

    def samples() -> Iterable[tuple[str, dict]]:
        for record in ingest_real_images(items, skipped=result.skipped, **ingest_kwargs):
            if not record.get("caption"):
                result.skipped.add("no_caption", record["image_id"])
                continue
            result.attempted += 1
            image_id = str(record.get("image_id", "?"))
            try:
                key = hashlib.sha256(image_id.encode()).hexdigest()[:16]
                keys.check(key)
                meta = {
                    "image_id": record["image_id"], "caption": record["caption"], "text": record["caption"],
                    "source": "real", "width": record["width"], "height": record["height"],
                    "person_box": list(record["person_box"]) if record.get("person_box") else None,
                }
                fields = {"jpg": encode_image(record["image"], "jpg"), "json": json_bytes(meta)}
            except Exception as err:  # noqa: BLE001 - one bad row costs only itself (check_failures bounds it)
                result.row_failed(image_id, err)
                continue
            manifest.append({"key": key, **{k: meta[k] for k in ("image_id", "caption", "width", "height")}})
            yield key, fields
        result.check_failures(out)

    write_shard(out, samples())
    result.rows = len(manifest)
    result.table = pd.DataFrame(manifest, columns=["key", "image_id", "caption", "width", "height"])
    write_table(result.table, out.with_suffix(".parquet"))
    return result


def detection_text(meta: dict) -> str:
    """What to search the image for: a synthetic prompt's content (its style words name no
    object), a real photo's caption. The content is the prompt's prefix, so offsets agree."""
    return meta.get("content") or meta.get("caption") or meta.get("text") or ""


DETECTION_COLUMNS = ["key", "source", "phrase", "start", "end", "x0", "y0", "x1", "y1", "score", "label"]


def detect(sources: list[tuple[Path, set[str] | None]], detector, out: Path, batch_size: int = 8) -> StepResult:
    """Detections of each caption's noun phrases in its image; all phrases of an image in one query."""
    from .detection import caption_phrases, with_head_query

    result = _start(out)
    rows: list[dict] = []
    batch: list[tuple[str, Image.Image, dict, list]] = []

    def detect_batch(items: list[tuple[str, Image.Image, dict, list]]) -> None:
        skipped = Skipped()  # merged only if the batch succeeds, so a retried row is counted once
        try:
            found = detector.detect([image for _, image, _, _ in items], [phrases for *_, phrases in items],
                                    keys=[k for k, _, _, _ in items], skipped=skipped)
            found_rows = [
                {"key": key, "source": meta.get("source", ""), "phrase": d.phrase.text,
                 "start": d.phrase.start, "end": d.phrase.end, "x0": d.box[0], "y0": d.box[1],
                 "x1": d.box[2], "y1": d.box[3], "score": float(d.score), "label": d.label}
                for (key, _, meta, _), detections in zip(items, found, strict=True) for d in detections
            ]
        except Exception as err:  # noqa: BLE001 - retried per row, then counted
            if len(items) == 1:
                result.row_failed(items[0][0], err)
                return
            for item in items:
                detect_batch([item])
            return
        result.skipped.update(skipped)
        rows.extend(found_rows)
        result.rows += len(items)

    def flush() -> None:
        if batch:
            detect_batch(list(batch))
            batch.clear()

    for shard, keys in sources:
        if not shard.exists():
            continue  # an optional branch (no real images configured) has no shard
        for key, image, meta in iter_images(shard, result.skipped, keys):
            result.attempted += 1
            try:
                phrases = with_head_query(caption_phrases(detection_text(meta)))
            except Exception as err:  # noqa: BLE001 - one bad row costs only itself
                result.row_failed(key, err)
                continue
            batch.append((key, image, meta, phrases))
            if len(batch) == batch_size:
                flush()
    flush()
    result.check_failures(out)
    result.table = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    write_table(result.table, out)
    return result


def detections_by_key(table: pd.DataFrame) -> dict[str, list]:
    from .detection import Detection, Phrase

    grouped: dict[str, list] = {}
    for row in table.itertuples(index=False):
        phrase = Phrase(row.phrase, int(row.start), int(row.end))
        grouped.setdefault(row.key, []).append(
            Detection(phrase, (row.x0, row.y0, row.x1, row.y1), float(row.score), row.label)
        )
    return grouped


def caption(
    stage: int,
    sources: list[tuple[Path, set[str] | None]],
    detections: pd.DataFrame,
    out: Path,
    *,
    seed: int,
    image_format: str = "jpg",
    **record_kwargs,
) -> StepResult:
    """Multimodal-caption records: crops inserted before their words (stage 1), or one
    high-resolution face/person crop (stage 2). Each record's random draws depend on its key."""
    from .captions import stage1_record, stage2_record

    make_record = {1: stage1_record, 2: stage2_record}[stage]
    image_format = _image_format(image_format)
    found = detections_by_key(detections)
    result = _start(out)
    manifest = []
    sample_keys = _Keys()

    def samples() -> Iterable[tuple[str, dict]]:
        for shard, keys in sources:
            if not shard.exists():
                continue
            for key, image, meta in iter_images(shard, result.skipped, keys):
                result.attempted += 1
                try:
                    sample_keys.check(key)
                    text = meta.get("text") or meta.get("caption") or ""
                    record = make_record(key, image, text, found.get(key, []),
                                         rng=rng_for(key, seed, f"stage{stage}"), skipped=result.skipped,
                                         **record_kwargs)
                    if record is None:
                        continue
                    record_meta = {"prompt": record.prompt, "caption": record.caption, "source": meta.get("source"),
                                   **record.meta}
                    entry = {"key": key, "prompt": record.prompt, "source": meta.get("source"),
                             "num_images": len(record.crops), "control": record.meta.get("control"),
                             "crop_areas": [_area_fraction(c["box"], record.target.size)
                                            for c in record.meta.get("crops", [])]}
                    fields = {image_format: encode_image(record.target, image_format), "json": json_bytes(record_meta)}
                    fields.update({name: encode_image(img, name) for name, img in record.crops.items()})
                except Exception as err:  # noqa: BLE001 - one bad row costs only itself (check_failures bounds it)
                    result.row_failed(key, err)
                    continue
                manifest.append(entry)
                yield key, fields
        result.check_failures(out)

    write_shard(out, samples())
    result.rows = len(manifest)
    result.table = pd.DataFrame(manifest, columns=["key", "prompt", "source", "num_images", "control", "crop_areas"])
    write_table(result.table, out.with_suffix(".parquet"))
    return result


def _area_fraction(box, size: tuple[int, int]) -> float:
    x0, y0, x1, y1 = box
    return round(max(0.0, x1 - x0) * max(0.0, y1 - y0) / (size[0] * size[1]), 4)


def validate_records(shard: Path, max_images: int, max_crops: int) -> list[str]:
    """Problems of a caption shard's records: unreadable, unparsable, or over the image limits."""
    from ..prompt import PromptError
    from .shards import sample_prompt

    problems: list[str] = []
    skipped = Skipped()
    for key, sample in read_shard(shard, skipped):
        try:
            prompt = sample_prompt(sample, key, max_images=max_images)
        except (PromptError, ShardError, ImageLoadError) as err:
            problems.append(f"{key}: {err}")
            continue
        crops = sum(1 for path in prompt.image_paths if path and path.startswith("crop"))
        if crops > max_crops:
            problems.append(f"{key}: {crops} crops, at most {max_crops}")
    problems.extend(f"{reason}: {examples}" for reason, examples in skipped.examples.items())
    return problems


def real_image_items(source: str | Path, shard_index: int, num_shards: int) -> Iterable[tuple]:
    """This shard's share of a real-image source: files of a folder by a stable hash of their
    path (decided before decoding), or every `num_shards`-th tar of a WebDataset source."""
    from .real_images import iter_image_folder, iter_webdataset

    source = Path(source)
    if source.is_dir() and not any(source.glob("*.tar")):
        return iter_image_folder(source, select=lambda image_id: shard_of(image_id, num_shards) == shard_index)
    tars = sorted(source.glob("*.tar")) if source.is_dir() else [source]
    return iter_webdataset(tars[shard_index::num_shards])


def preview_grid(shard: Path, out: Path, records: int = 4, cell: int = 128) -> int:
    """A PNG of the first records: the target, then each conditioning image in prompt order,
    one row per record, for eyeballing crops against their captions. Returns the rows drawn."""
    from ..atomic import write_bytes_atomic
    from .shards import sample_prompt

    rows: list[list[Image.Image]] = []
    skipped = Skipped()
    for key, sample in read_shard(shard, skipped):
        if len(rows) == records:
            break
        try:
            prompt = sample_prompt(sample, key)
            field_name = next(f for f in ("jpg", "png") if f in sample)
            target = decode_image(sample[field_name], f"{key}.{field_name}")
        except (ShardError, ImageLoadError, StopIteration, ValueError):
            continue
        rows.append([target, *prompt.images])
    if not rows:
        return 0
    width = max(len(row) for row in rows)
    grid = Image.new("RGB", (width * cell, len(rows) * cell), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            thumb = image.copy()
            thumb.thumbnail((cell - 4, cell - 4))
            grid.paste(thumb, (x * cell + 2, y * cell + 2))
    write_bytes_atomic(out, encode_image(grid, "png"))
    return len(rows)
