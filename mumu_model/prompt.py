"""The multimodal prompt: text with images inline.

Two equivalent forms (docs/prompt_format.md):
- Python: a list mixing str and PIL images, as in Emu2-Gen: `["a ", man_image, " man"]`.
- Text: `"a <img:people/man.png> man"`, with paths relative to an image root. This is the
  form that goes into prompt files, datasets and the CLI.

The empty prompt is valid: it is the unconditional prompt of classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .atomic import write_bytes_atomic
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, resolve_image_path, to_rgb

Part = str | Image.Image

_IMAGE_TAG = "<img:"
_LITERAL_HINT = "write '<<' for a literal '<'"


class PromptError(ValueError):
    """A malformed prompt; `str(err)` is "{unit} {position}: {problem}".

    For the text form `unit` is "position" and `position` the 0-based character offset of
    the '<' that starts the offending tag; for the Python form it is "part" and the index of
    the offending part. `position` is None when the problem is the prompt as a whole.
    """

    def __init__(self, problem: str, position: int | None = None, unit: str = "position"):
        # All in args, so the error pickles intact out of DataLoader worker processes.
        super().__init__(problem, position, unit)
        self.problem = problem
        self.position = position
        self.unit = unit

    def __str__(self) -> str:
        if self.position is None:
            return self.problem
        return f"{self.unit} {self.position}: {self.problem}"


@dataclass(frozen=True)
class _ImageTag:
    reference: str
    position: int


class MultimodalPrompt:
    """An immutable sequence of text and RGB images.

    Adjacent strings are merged and empty strings dropped, so two prompts that read the same
    compare equal. Images are copied to RGB on the way in; the ones handed out by `.images`
    and `.parts` are the prompt's own and must not be modified.
    """

    def __init__(self, parts: Sequence[Part] = (), *, max_images: int | None = 4):
        if isinstance(parts, str):
            raise PromptError("parts must be a list; for the text form use from_text")
        if isinstance(parts, bytes) or not isinstance(parts, Sequence):
            raise PromptError(f"parts must be a list of str and images, got {type(parts).__name__}")
        _check_max_images(max_images)
        normalized: list[Part] = []
        num_images = 0
        for index, part in enumerate(parts):
            if isinstance(part, str):
                if not part:
                    continue
                if normalized and isinstance(normalized[-1], str):
                    normalized[-1] += part
                else:
                    normalized.append(part)
            elif isinstance(part, Image.Image):
                num_images += 1
                if max_images is not None and num_images > max_images:
                    raise PromptError(_too_many(parts, max_images), index, "part")
                normalized.append(to_rgb(part))
            else:
                raise PromptError(
                    f"expected str or PIL image, got {type(part).__name__}", index, "part"
                )
        self._parts: tuple[Part, ...] = tuple(normalized)
        self._image_paths: tuple[str | None, ...] = (None,) * num_images

    # -- accessors -------------------------------------------------------------------------

    @property
    def parts(self) -> tuple[Part, ...]:
        return self._parts

    @property
    def images(self) -> list[Image.Image]:
        return [part for part in self._parts if isinstance(part, Image.Image)]

    @property
    def num_images(self) -> int:
        return len(self._image_paths)

    @property
    def is_empty(self) -> bool:
        return not self._parts

    @property
    def image_paths(self) -> tuple[str | None, ...]:
        """Per image, its reference in the text form it was read from, else None."""
        return self._image_paths

    def text_with_placeholders(self, placeholder: str) -> str:
        """The text with `placeholder` in place of each image, e.g. "a <image> man"."""
        return "".join(placeholder if isinstance(p, Image.Image) else p for p in self._parts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MultimodalPrompt):
            return NotImplemented
        return len(self._parts) == len(other._parts) and all(
            _part_equal(a, b) for a, b in zip(self._parts, other._parts)
        )

    __hash__ = None  # type: ignore[assignment]  # equality looks at pixels, which may change

    def __repr__(self) -> str:
        return f"MultimodalPrompt({', '.join(_short_repr(part) for part in self._parts)})"

    # -- text form -------------------------------------------------------------------------

    @classmethod
    def from_text(
        cls,
        text: str,
        image_root: str | os.PathLike | None = None,
        *,
        max_images: int | None = 4,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        images: Mapping[str, Image.Image] | None = None,
    ) -> MultimodalPrompt:
        """Parse the text form; image paths are relative to `image_root`.

        With `images`, references are names in that mapping instead of files, e.g. the members
        of a dataset record (`<img:crop0.png>` -> `images["crop0.png"]`); nothing is read from disk.

        The whole text is parsed before any file is opened, so a typo is reported without
        touching the disk; after that the first problem in reading order is reported.
        """
        if not isinstance(text, str):
            raise PromptError(f"text must be a str, got {type(text).__name__}")
        _check_max_images(max_images)
        tokens = _parse(text)
        tags = [token for token in tokens if isinstance(token, _ImageTag)]
        if max_images is not None and len(tags) > max_images:
            raise PromptError(
                f"{len(tags)} images, at most {max_images} allowed", tags[max_images].position
            )
        if tags and image_root is None and images is None:
            raise PromptError(
                f"image {tags[0].reference!r} needs an image_root to be resolved against",
                tags[0].position,
            )

        parts: list[Part] = []
        for token in tokens:
            if isinstance(token, str):
                parts.append(token)
                continue
            if images is not None:
                if token.reference not in images:
                    raise PromptError(f"image {token.reference!r} is not among the record's images", token.position)
                parts.append(to_rgb(images[token.reference]))
                continue
            try:
                path = resolve_image_path(token.reference, image_root)
                parts.append(load_image(path, max_pixels=max_pixels))
            except ImageLoadError as err:
                where = "" if str(err.path) == token.reference else f" ({err.path})"
                problem = f"image {token.reference!r}: {err.problem}{where}"
                raise PromptError(problem, token.position) from err
        # The parser already merged the text and the loader made fresh RGB images, so skip
        # __init__ rather than copy every image a second time.
        prompt = cls.__new__(cls)
        prompt._parts = tuple(parts)
        prompt._image_paths = tuple(tag.reference for tag in tags)
        return prompt

    def to_text(self, image_root: str | os.PathLike | None = None) -> str:
        """The text form. Images read from a text form keep their reference; other images are
        saved into `image_root` as content-addressed PNGs and referenced by file name."""
        pieces: list[str] = []
        image_index = 0
        for index, part in enumerate(self._parts):
            if isinstance(part, str):
                pieces.append(part.replace("<", "<<"))
                continue
            reference = self._image_paths[image_index]
            image_index += 1
            if reference is None:
                if image_root is None:
                    raise PromptError(
                        "image has no file to refer to; pass an image_root to save it in",
                        index,
                        "part",
                    )
                reference = _save_content_addressed(part, Path(image_root))
            pieces.append(f"{_IMAGE_TAG}{reference}>")
        return "".join(pieces)

    @classmethod
    def coerce(
        cls,
        prompt: MultimodalPrompt | str | Sequence[Part],
        image_root: str | os.PathLike | None = None,
        *,
        max_images: int | None = 4,
    ) -> MultimodalPrompt:
        """Accept any prompt form a pipeline may be given: a MultimodalPrompt, the text form,
        or a list/tuple of parts (Python form)."""
        if isinstance(prompt, MultimodalPrompt):
            _check_max_images(max_images)
            if max_images is not None and prompt.num_images > max_images:
                image_parts = [i for i, p in enumerate(prompt.parts) if isinstance(p, Image.Image)]
                message = f"{prompt.num_images} images, at most {max_images} allowed"
                raise PromptError(message, image_parts[max_images], "part")
            return prompt
        if isinstance(prompt, str):
            return cls.from_text(prompt, image_root, max_images=max_images)
        if isinstance(prompt, (list, tuple)):
            return cls(prompt, max_images=max_images)
        raise PromptError(
            f"expected a MultimodalPrompt, a str or a list of parts, got {type(prompt).__name__}"
        )


def _parse(text: str) -> list[str | _ImageTag]:
    """Split the text form into literal strings and image tags (syntax only, no files)."""
    tokens: list[str | _ImageTag] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        start = text.find("<", i)
        if start == -1:
            literal.append(text[i:])
            break
        literal.append(text[i:start])
        if text.startswith("<<", start):
            literal.append("<")
            i = start + 2
            continue
        if not text.startswith(_IMAGE_TAG, start):
            raise PromptError(f"unknown tag {_tag_excerpt(text, start)}; {_LITERAL_HINT}", start)
        path_start = start + len(_IMAGE_TAG)
        end = _find_any(text, ">\n<", path_start)
        if end == -1 or text[end] != ">":
            # A '<' inside a path is far more likely a missing '>' than a real file name.
            written = _shorten(text[start:] if end == -1 else text[start:end])
            before = "the end of the text" if end == -1 else repr(text[end])
            raise PromptError(f"unclosed image tag {written}: expected '>' before {before}", start)
        reference = text[path_start:end]
        if not reference:
            raise PromptError("empty image path in '<img:>'", start)
        if reference != reference.strip():
            raise PromptError(f"whitespace around the image path {reference!r}", start)
        if literal:
            tokens.append("".join(literal))
            literal = []
        tokens.append(_ImageTag(reference, start))
        i = end + 1
    if "".join(literal):
        tokens.append("".join(literal))
    return tokens


def _find_any(text: str, chars: str, start: int) -> int:
    hits = [hit for hit in (text.find(c, start) for c in chars) if hit != -1]
    return min(hits, default=-1)


def _tag_excerpt(text: str, start: int) -> str:
    """The tag as written, up to its '>' or the end of its line."""
    end = _find_any(text, ">\n", start + 1)
    if end == -1:
        return _shorten(text[start:])
    return _shorten(text[start : end + 1] if text[end] == ">" else text[start:end])


def _shorten(text: str, limit: int = 24) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _save_content_addressed(image: Image.Image, root: Path) -> str:
    """Save as `{sha256[:16]}.png` in `root` (once) and return the file name."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    name = hashlib.sha256(data).hexdigest()[:16] + ".png"
    path = root / name
    if path.exists():  # same name means same bytes
        return name
    write_bytes_atomic(path, data)  # a concurrent reader never sees half a PNG
    return name


def _check_max_images(max_images: int | None) -> None:
    if max_images is not None and (not isinstance(max_images, int) or max_images < 0):
        raise ValueError(f"max_images must be None or an int >= 0, got {max_images!r}")


def _too_many(parts: Sequence[object], max_images: int) -> str:
    count = sum(isinstance(part, Image.Image) for part in parts)
    return f"{count} images, at most {max_images} allowed"


def _part_equal(a: Part, b: Part) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def _short_repr(part: Part, limit: int = 40) -> str:
    if isinstance(part, Image.Image):
        return f"<image {part.width}x{part.height}>"
    return repr(part if len(part) <= limit else part[:limit] + "...")
