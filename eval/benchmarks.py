"""Public benchmark formats into suite YAML (`mumu eval import`): DreamBench and OmniContext.

Both write suites whose prompts name their images inline (`a <img:dog/00.jpg> dog in the snow`),
with one object per image slot, so the evaluation scores them with DreamBench's metrics and,
for two or more slots, the slot-binding judge (`eval.binding`). Images are not copied: the
suite's `image_root` points at the benchmark's folder, relative to the suite file.

DreamBench-style folder (as google/dreambooth's `dataset/`):

    FOLDER/prompts_and_classes.txt
    FOLDER/<subject>/*.jpg|*.png          # one folder per subject, e.g. dog/00.jpg ... dog/04.jpg

`prompts_and_classes.txt` lists `subject_name,class` lines (`dog,dog`, `bear_plushie,stuffed
animal`), then an `Object Prompts` and a `Live Subject Prompts` list of
`'a {0} {1} in the jungle'.format(unique_token, class_token),` lines. Live subjects (class cat or
dog, as DreamBench sorts them) take the live prompts, the others the object prompts. Each
(subject, prompt) becomes an entry: `{0}` is the subject's first image as a slot, `{1}` its class
(the detector's phrase), and every image of the subject is a reference (CLIP-I and DINO average
over them, as DreamBench does). One suite: `dreambench.yaml`.

OmniContext-style JSON: a list of records

    {"key": "0001", "task_type": "multi_object",
     "instruction": "The cat from image 1 sits beside the cup from image 2 on a table.",
     "input_images": ["images/0001_1.jpg", "images/0001_2.jpg"]}

with image paths relative to the JSON file. Each "<noun> from image N" (or "in" / "of image N")
becomes a slot: "the <img:images/0001_1.jpg> cat sits beside ...", the noun its phrase. One
suite per task type: `omnicontext_<task_type>.yaml`.

A record or subject that cannot be imported (an image missing, an instruction whose images and
`input_images` disagree) is a `BenchmarkProblem`; the rest are written and the problems
returned, so nothing is dropped unannounced.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mumu_model.atomic import write_bytes_atomic
from mumu_model.images import ImageLoadError, resolve_image_path

from .suites import SuiteError, load_suite

DREAMBENCH_FILE = "prompts_and_classes.txt"
DREAMBENCH_LIVE_CLASSES = ("cat", "dog")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_TEMPLATE = re.compile(r"""^\s*(['"])(?P<template>.*)\1\s*\.format\(""")
_SLOT = re.compile(r"\b(?P<noun>[A-Za-z][\w-]*)\s+(?:from|in|of)\s+image\s+(?P<number>\d+)\b", re.IGNORECASE)
_IMAGE_NUMBER = re.compile(r"\bimage\s+(\d+)\b", re.IGNORECASE)
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class BenchmarkProblem:
    """One record or subject that was not imported, and why."""

    item: str
    message: str

    def __str__(self) -> str:
        return f"{self.item}: {self.message}"


def _text(words: str) -> str:
    """Words as prompt text: '<' is the tag opener, written '<<' for a literal one."""
    return words.replace("<", "<<")


def _name(text: str) -> str:
    return _NAME_CHARS.sub("_", text).strip("_") or "x"


def _write_suite(path: Path, suite: dict, source: str) -> Path:
    """Write `suite` as YAML atomically, then load it back: a suite the evaluation would refuse
    is an error here, not at the start of an evaluation."""
    text = f"# Imported by `mumu eval import` from {source}; edit the source and import again.\n"
    text += yaml.safe_dump(suite, sort_keys=False, allow_unicode=True, width=1000)
    write_bytes_atomic(path, text.encode())
    loaded = load_suite(path)
    if loaded.errors:
        path.unlink()
        raise SuiteError(f"{path}: imported entries the suite format refuses: {loaded.errors[0]}")
    return path


def _image_root(images: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(images.resolve(), out_dir.resolve())).as_posix()


# -- DreamBench ----------------------------------------------------------------------------


def read_dreambench_prompts(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """({subject: class}, object prompt templates, live subject prompt templates) of a
    DreamBench `prompts_and_classes.txt`; ValueError naming the line when it reads wrong."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        lower = stripped.lower()
        if lower in ("classes", "prompts"):
            section = lower
        elif lower.startswith("object prompts"):
            section = "object"
        elif lower.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in stripped and lower != "subject_name,class":
            subject, cls = (part.strip() for part in stripped.split(",", 1))
            if not subject or not cls:
                raise ValueError(f"{path}:{number}: expected 'subject_name,class', got {stripped!r}")
            classes[subject] = cls
        elif section in lists and (match := _TEMPLATE.match(stripped)):
            template = match["template"]
            if "{0}" not in template or "{1}" not in template:
                raise ValueError(f"{path}:{number}: a prompt needs {{0}} (the subject) and {{1}} (its class)")
            lists[section].append(template)
    if not classes:
        raise ValueError(f"{path}: no 'subject_name,class' lines under 'Classes'")
    if not lists["object"] or not lists["live"]:
        raise ValueError(f"{path}: needs both an 'Object Prompts' and a 'Live Subject Prompts' list")
    return classes, lists["object"], lists["live"]


def import_dreambench(folder: str | Path, out_dir: str | Path) -> tuple[list[Path], list[BenchmarkProblem]]:
    """`dreambench.yaml` in `out_dir` from a DreamBench-style folder (module docstring)."""
    folder, out_dir = Path(folder), Path(out_dir)
    prompts = folder / DREAMBENCH_FILE
    if not prompts.is_file():
        raise ValueError(f"{folder}: no {DREAMBENCH_FILE} (a DreamBench-style folder has one, "
                         "and a folder of images per subject)")
    classes, object_prompts, live_prompts = read_dreambench_prompts(prompts)
    entries, problems = [], []
    for subject, cls in classes.items():
        images = sorted(p for p in (folder / subject).glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) \
            if (folder / subject).is_dir() else []
        if not images:
            problems.append(BenchmarkProblem(subject, f"no images in {folder / subject}"))
            continue
        slot = f"{subject}/{images[0].name}"
        references = [f"{subject}/{p.name}" for p in images]
        templates = live_prompts if cls.lower() in DREAMBENCH_LIVE_CLASSES else object_prompts
        for index, template in enumerate(templates):
            entries.append({
                "id": f"{_name(subject)}_{index:02d}",
                "prompt": _text(template).format(f"<img:{slot}>", _text(cls)),
                "objects": [{"image": slot, "phrase": cls}],
                "references": references,
            })
    if not entries:
        raise ValueError(f"{folder}: no subject could be imported: {'; '.join(map(str, problems))}")
    suite = {"name": "dreambench", "version": 1, "image_root": _image_root(folder, out_dir), "entries": entries}
    return [_write_suite(out_dir / "dreambench.yaml", suite, f"DreamBench folder {folder.name}")], problems


# -- OmniContext ---------------------------------------------------------------------------


def omnicontext_prompt(instruction: str, images: Sequence[str]) -> tuple[str, list[dict[str, str]]]:
    """The prompt text and objects of one instruction: "the cat from image 1" -> "the
    <img:IMAGES[0]> cat", object {image, phrase: cat}. ValueError when the images the instruction
    names and `images` disagree."""
    slots = list(_SLOT.finditer(instruction))
    named = sorted({int(n) for n in _IMAGE_NUMBER.findall(instruction)})
    numbers = [int(m["number"]) for m in slots]
    if named != list(range(1, len(images) + 1)):
        raise ValueError(f"the instruction names images {named or 'none'} but input_images has {len(images)}")
    if sorted(set(numbers)) != named or len(numbers) != len(set(numbers)):
        unmatched = sorted(set(named) - set(numbers)) or sorted({n for n in numbers if numbers.count(n) > 1})
        raise ValueError(f"image {unmatched[0]}: expected each image named once, as '<noun> from image N'")
    parts, objects, position = [], [], 0
    for match in slots:
        image = images[int(match["number"]) - 1]
        parts += [_text(instruction[position:match.start()]), f"<img:{image}> {_text(match['noun'])}"]
        objects.append({"image": image, "phrase": match["noun"]})
        position = match.end()
    parts.append(_text(instruction[position:]))
    return "".join(parts), objects


def import_omnicontext(path: str | Path, out_dir: str | Path) -> tuple[list[Path], list[BenchmarkProblem]]:
    """`omnicontext_<task_type>.yaml` in `out_dir`, one per task, from an OmniContext-style
    JSON (module docstring)."""
    path, out_dir = Path(path), Path(out_dir)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read as JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty list of records (key, task_type, instruction, input_images)")
    root = path.parent
    tasks: dict[str, list[dict]] = {}
    problems = []
    for index, record in enumerate(records):
        key = str(record.get("key", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        try:
            if not isinstance(record, dict):
                raise ValueError("a record must be a mapping")
            task, instruction, images = record.get("task_type"), record.get("instruction"), record.get("input_images")
            if not isinstance(task, str) or not task or not isinstance(instruction, str) or not instruction.strip():
                raise ValueError("needs a 'task_type' and an 'instruction' (strings)")
            if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
                raise ValueError("'input_images' must be a non-empty list of image paths")
            for number, image in enumerate(images, 1):
                try:
                    found = resolve_image_path(image, root)
                except ImageLoadError as err:
                    raise ValueError(f"image {number} {image!r}: {err.problem}") from None
                if not found.is_file():
                    raise ValueError(f"image {number} {image!r}: no such file under {root}")
            prompt, objects = omnicontext_prompt(instruction, images)
            if any(entry["id"] == _name(key) for entry in tasks.get(task, [])):
                raise ValueError(f"a second record with key {key!r} in task {task!r}")
        except ValueError as err:
            problems.append(BenchmarkProblem(f"record {key}", str(err)))
            continue
        tasks.setdefault(task, []).append({"id": _name(key), "prompt": prompt, "text": instruction,
                                           "objects": objects, "references": list(dict.fromkeys(images))})
    if not tasks:
        raise ValueError(f"{path}: no record could be imported: {'; '.join(map(str, problems[:5]))}")
    written = []
    for task, entries in tasks.items():
        name = f"omnicontext_{_name(task)}"
        suite = {"name": name, "version": 1, "image_root": _image_root(root, out_dir), "entries": entries}
        written.append(_write_suite(out_dir / f"{name}.yaml", suite, f"OmniContext JSON {path.name}"))
    return written, problems


BENCHMARKS = {"dreambench": import_dreambench, "omnicontext": import_omnicontext}
