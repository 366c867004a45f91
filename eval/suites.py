"""Prompt suites: versioned YAML files of multimodal prompts with their reference images.

A suite file (`eval/suites/*.yaml`, format in `eval/suites/README.md`):

    name: single_subject          # letters, digits, "_", "-", "." (it names MLflow metrics)
    version: 1                    # bump it whenever an entry or an image changes
    image_root: images            # folder of the images, relative to the suite file
    entries:
      - id: cat_beach             # unique within the suite
        prompt: "a <img:cat.jpg> cat on the beach"     # text form, paths under image_root
        text: "a cat on the beach"                      # optional: what CLIP-T/PickScore read
        objects: [{image: cat.jpg, phrase: cat}]        # multimodal CLIP score; optional box
        references: [cat.jpg]                           # CLIP-I and DINO
        faces: []                                       # face consistency (portraits)

A suite drawn from a procedural world names it, and its objects may then name the colour and
shape the output should take from their images (the toy world's captions leave the colour
out, so only the conditioning crop can supply it):

    world: toy                    # a world registered under the `mumu.worlds` entry points
    entries:
      - objects: [{image: 0007.png, phrase: circle, colour: red, shape: circle}]

`colour` and `shape` must be names of the world (`eval.worlds`); the world's model-free metrics
score the entries that name them.

An entry with two or more objects is judged for slot binding (`eval.binding`): its objects are
the prompt's slots, so each object's image must be one of the prompt's `<img:...>` images (else
the entry is an `EntryError`).

Loading is in two steps so that bad input costs one entry, not the run:
- `load_suite(path)` reads the file. A problem with the file itself (not YAML, no version, no
  entries) raises `SuiteError`; a malformed entry becomes an `EntryError` in `suite.errors`.
- `load_entry(suite, entry, max_images)` opens the entry's images; a missing image or too
  many images for the model raises `EntryError`, which `evaluate` records and moves on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from mumu_model.images import ImageLoadError, load_image, resolve_image_path
from mumu_model.prompt import MultimodalPrompt, PromptError

from .worlds import World, load_world

BUILTIN_SUITES_DIR = Path(__file__).resolve().parent / "suites"
SUITE_SUFFIXES = (".yaml", ".yml", ".json")

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENTRY_FIELDS = {"id", "prompt", "text", "objects", "references", "faces"}
_OBJECT_FIELDS = {"image", "phrase", "box", "colour", "shape"}

Box = tuple[float, float, float, float]


class SuiteError(ValueError):
    """A suite file that cannot be used at all (nothing in it can be scored)."""


@dataclass(frozen=True)
class EntryError(Exception):
    """One entry that could not be scored, and why. Collected in `EvalResult.errors`."""

    suite: str
    entry: str
    message: str

    def __str__(self) -> str:
        return f"{self.suite}/{self.entry}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"suite": self.suite, "entry": self.entry, "message": self.message}


@dataclass(frozen=True)
class SuiteObject:
    image: str  # reference under the suite's image_root
    phrase: str  # what the detector looks for in the output
    box: Box | None = None  # optional region of `image` that is the object (x0, y0, x1, y1)
    colour: str | None = None  # a colour of the suite's world the output should carry
    shape: str | None = None  # a shape of the suite's world the output should draw for it


@dataclass(frozen=True)
class SuiteEntry:
    id: str
    prompt: str
    text: str | None = None
    objects: tuple[SuiteObject, ...] = ()
    references: tuple[str, ...] = ()
    faces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    path: Path
    image_root: Path
    entries: tuple[SuiteEntry, ...]
    errors: tuple[EntryError, ...] = ()  # entries malformed in the file itself
    sha256: str = ""  # of the file and every image it names that exists: catches un-bumped edits
    world: str | None = None  # the registered world whose metrics score it (`eval.worlds`)


@dataclass
class LoadedEntry:
    """An entry with its images open, ready to generate and score."""

    suite: str
    entry: SuiteEntry
    prompt: MultimodalPrompt
    text: str  # the prompt's words, for CLIP-T and PickScore
    objects: list[tuple[Image.Image, str]] = field(default_factory=list)  # (object image, phrase)
    references: list[Image.Image] = field(default_factory=list)
    faces: list[Image.Image] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def text_only(self) -> bool:
        return self.prompt.num_images == 0

    @property
    def world_objects(self) -> list[tuple[str | None, str | None]]:
        """(colour, shape) of every object, None where the suite names none: what a world scores."""
        return [(o.colour, o.shape) for o in self.entry.objects]


# -- finding suite files -------------------------------------------------------------------


def builtin_suites() -> list[Path]:
    """The suites shipped in `eval/suites/`, by name."""
    return sorted(p for p in BUILTIN_SUITES_DIR.iterdir() if p.suffix in SUITE_SUFFIXES)


def resolve_suites(specs: Iterable[str | Path]) -> list[Path]:
    """Suite files from names of built-in suites ("portraits"), files, or folders of files."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SUITE_SUFFIXES)
            if not found:
                raise SuiteError(f"suite folder {path} has no {'/'.join(SUITE_SUFFIXES)} files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif _NAME.match(str(spec)) and (BUILTIN_SUITES_DIR / f"{spec}.yaml").is_file():
            paths.append(BUILTIN_SUITES_DIR / f"{spec}.yaml")
        else:
            names = ", ".join(p.stem for p in builtin_suites())
            raise SuiteError(f"suite {str(spec)!r}: no such file, folder or built-in suite ({names})")
    return paths


# -- reading a suite file ------------------------------------------------------------------


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SuiteError(f"suite {path}: cannot read: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise SuiteError(f"suite {path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SuiteError(f"suite {path}: expected a mapping with name, version and entries")
    unknown = set(data) - {"name", "version", "image_root", "entries", "description", "world"}
    if unknown:
        raise SuiteError(f"suite {path}: unknown fields {sorted(unknown)}")

    name = str(data.get("name") or path.stem)
    if not _NAME.match(name):
        raise SuiteError(f"suite {path}: name {name!r} may use only letters, digits, '_', '-', '.'")
    if data.get("version") in (None, ""):
        raise SuiteError(f"suite {path}: no version field (add 'version: 1' and bump it on every change)")
    version = str(data["version"])
    image_root = (path.parent / str(data.get("image_root", "images"))).resolve()
    items = data.get("entries")
    if not isinstance(items, list) or not items:
        raise SuiteError(f"suite {path}: 'entries' must be a non-empty list")
    world = None
    if data.get("world") is not None:
        try:
            world = load_world(str(data["world"]))
        except ValueError as err:
            raise SuiteError(f"suite {path}: {err}") from None

    entries: list[SuiteEntry] = []
    errors: list[EntryError] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        entry_id = str(item.get("id")) if isinstance(item, dict) and item.get("id") is not None else f"#{index}"
        try:
            entry = _parse_entry(item, world)
        except ValueError as err:
            errors.append(EntryError(name, entry_id, str(err)))
            continue
        if entry.id in seen:
            errors.append(EntryError(name, entry.id, f"duplicate id (entry #{index})"))
            continue
        seen.add(entry.id)
        entries.append(entry)
    return Suite(
        name=name,
        version=version,
        path=path,
        image_root=image_root,
        entries=tuple(entries),
        errors=tuple(errors),
        sha256=_suite_hash(raw, image_root, entries),
        world=None if world is None else str(data["world"]),
    )


def _parse_entry(item: object, world: World | None) -> SuiteEntry:
    if not isinstance(item, dict):
        raise ValueError(f"an entry must be a mapping, got {type(item).__name__}")
    unknown = set(item) - _ENTRY_FIELDS
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    entry_id = item.get("id")
    if not isinstance(entry_id, (str, int)) or not _NAME.match(str(entry_id)):
        raise ValueError("'id' must be letters, digits, '_', '-' or '.'")
    prompt = item.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string (the text form, '<img:PATH>' for images)")
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError("'text' must be a string")
    objects = tuple(_parse_object(o, i, world) for i, o in enumerate(_list(item, "objects")))
    entry = SuiteEntry(
        id=str(entry_id),
        prompt=prompt,
        text=text,
        objects=objects,
        references=tuple(_strings(item, "references")),
        faces=tuple(_strings(item, "faces")),
    )
    if len(objects) >= 2:
        # Several objects are the prompt's slots, judged for binding: each must be one of its images.
        slots = entry_prompt_images(entry)
        for index, obj in enumerate(objects):
            if obj.image not in slots:
                raise ValueError(f"objects[{index}] image {obj.image!r} is not one of the prompt's "
                                 f"{len(slots)} image slots ({', '.join(slots) or 'none'})")
    return entry


def _list(item: dict, key: str) -> list:
    value = item.get(key) or []
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list")
    return value


def _strings(item: dict, key: str) -> list[str]:
    values = _list(item, key)
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"'{key}' must be a list of image paths")
    return values


def _parse_object(item: object, index: int, world: World | None) -> SuiteObject:
    if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(item.get("phrase"), str):
        raise ValueError(f"objects[{index}] must be {{image: PATH, phrase: WORDS}}")
    unknown = set(item) - _OBJECT_FIELDS
    if unknown:
        raise ValueError(f"objects[{index}]: unknown fields {sorted(unknown)}")
    if not item["phrase"].strip():
        raise ValueError(f"objects[{index}]: empty phrase")
    box = item.get("box")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"objects[{index}]: box must be [x0, y0, x1, y1]")
        box = tuple(float(v) for v in box)
    colour, shape = item.get("colour"), item.get("shape")
    for name, value in (("colour", colour), ("shape", shape)):
        if value is None:
            continue
        if world is None:
            raise ValueError(f"objects[{index}]: names a {name}, but the suite names no world (add 'world: NAME')")
        known = world.colours if name == "colour" else world.shapes
        if not isinstance(value, str) or value not in known:
            raise ValueError(f"objects[{index}]: unknown {name} {value!r} (known: {', '.join(known)})")
    return SuiteObject(item["image"], item["phrase"].strip(), box, colour, shape)


def _suite_hash(raw: bytes, image_root: Path, entries: Sequence[SuiteEntry]) -> str:
    digest = hashlib.sha256(raw)
    names: set[str] = set()
    for entry in entries:
        names.update(entry.references)
        names.update(entry.faces)
        names.update(o.image for o in entry.objects)
        names.update(entry_prompt_images(entry))
    for name in sorted(names):
        try:
            data = resolve_image_path(name, image_root).read_bytes()
        except (ImageLoadError, OSError):
            continue  # reported per entry by load_entry
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def entry_prompt_images(entry: SuiteEntry) -> list[str]:
    """The image references of the entry's prompt (syntax only; no file is opened)."""
    try:
        prompt = MultimodalPrompt.from_text(entry.prompt, None, max_images=None, images=_AnyImage())
    except PromptError:
        return []
    return [p for p in prompt.image_paths if p is not None]


class _AnyImage(dict):
    """A mapping that has every name, so `from_text` parses without opening files."""

    _blank = Image.new("RGB", (1, 1))

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> Image.Image:
        return self._blank


# -- opening an entry's images -------------------------------------------------------------


def load_entry(suite: Suite, entry: SuiteEntry, max_images: int | None) -> LoadedEntry:
    """Open the entry's prompt and images; `EntryError` names what is wrong."""

    def fail(message: str) -> EntryError:
        return EntryError(suite.name, entry.id, message)

    try:
        prompt = MultimodalPrompt.from_text(entry.prompt, suite.image_root, max_images=max_images)
    except PromptError as err:
        # "3 images, at most 2 allowed" or "image 'x.png': no such file" with its position.
        raise fail(f"prompt {entry.prompt!r}: {err}") from err

    def image(reference: str, role: str) -> Image.Image:
        try:
            return load_image(resolve_image_path(reference, suite.image_root))
        except ImageLoadError as err:
            raise fail(f"{role} image {reference!r}: {err.problem}") from err

    objects = []
    for index, obj in enumerate(entry.objects):
        picture = image(obj.image, f"objects[{index}]")
        if obj.box is not None:
            from mumu_model.data.detection import crop

            try:
                picture = crop(picture, obj.box)
            except ValueError as err:
                raise fail(f"objects[{index}]: {err}") from err
        objects.append((picture, obj.phrase))
    return LoadedEntry(
        suite=suite.name,
        entry=entry,
        prompt=prompt,
        text=entry.text if entry.text is not None else prompt_words(prompt),
        objects=objects,
        references=[image(r, "reference") for r in entry.references],
        faces=[image(f, "face") for f in entry.faces],
    )


def prompt_words(prompt: MultimodalPrompt) -> str:
    """The prompt with its images left out: "a <img:cat.jpg> cat" -> "a cat" (DreamBench's
    CLIP-T reads the prompt with the class noun in place of the subject token)."""
    text = " ".join(prompt.text_with_placeholders(" ").split())
    return re.sub(r"\s+([,.;:!?])", r"\1", text)
