"""A web demo of a MUMU pipeline: `mumu demo --model DIR` (Gradio, on 127.0.0.1 by default).

The user writes the prompt with `<image1>`, `<image2>`, ... where the images go ("a <image1>
man and his <image2> dog"), drops or uploads each image in its slot, and sets steps, guidance,
seed and size; the output is shown beside the images it was conditioned on. Steps, guidance and
size start from the model's own sampling defaults (saved with the pipeline), and the size control
offers only the sizes the model was made for. A few clickable examples, taken from prompt
suites (`suite_examples`: one object, two objects, ...), fill the prompt and the slots. A mistake
(an empty slot that the prompt names, an image that cannot be read, too many images, no text)
is shown in the page as one line, and the app goes on serving.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .images import ImageLoadError, load_image, resolve_image_path

MARKER = re.compile(r"<image(\d+)>")
# The prompt suites the examples come from when `mumu demo` is given none: the toy world's
# validation suites (crops of one, two and three objects), shipped with the `eval` package
# beside this one. Read as data files; the library imports nothing of `eval`.
DEFAULT_EXAMPLE_SUITES = Path(__file__).resolve().parent.parent / "eval" / "suites" / "toy" / "validation"


@dataclass(frozen=True)
class Example:
    """A clickable example: its label, the prompt with `<imageN>` markers, and the file of each slot."""

    label: str
    text: str
    files: tuple[str, ...]


def _suite_files(paths: Iterable[str | Path]) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.glob("*.yaml")))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"examples {path}: no such suite file or folder")
    return found


def _example(prompt_text: str, image_root: Path, label: str) -> Example:
    """A suite entry's text-form prompt ("a <img:000a.png> cross") as an example whose images
    are confined to `image_root` and readable."""
    from .prompt import MultimodalPrompt

    prompt = MultimodalPrompt.from_text(prompt_text, image_root, max_images=None)  # reads and checks them
    files = tuple(str(resolve_image_path(reference, image_root)) for reference in prompt.image_paths)
    pieces, slot = [], 0
    for part in prompt.parts:
        if isinstance(part, Image.Image):
            slot += 1
            pieces.append(f"<image{slot}>")
        else:
            pieces.append(part)
    return Example(label, "".join(pieces), files)


def suite_examples(paths: Iterable[str | Path], max_images: int, limit: int = 3) -> list[Example]:
    """Up to `limit` examples from prompt suites (YAML files, or folders of them): the first entry
    with one image, then the first with two, and so on up to `max_images`, so the page shows the
    model with each number of images it takes. Raises ValueError naming a missing or malformed
    suite or an unreadable image."""
    import yaml

    by_count: dict[int, Example] = {}
    for suite in _suite_files(paths):
        try:
            data = yaml.safe_load(suite.read_text())
            image_root = suite.parent / data.get("image_root", ".")
            entries = data["entries"]
        except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"examples {suite}: not a prompt suite ({type(err).__name__}: {err})") from None
        for entry in entries:
            prompt = entry.get("prompt") if isinstance(entry, dict) else None
            if not isinstance(prompt, str):
                continue
            count = prompt.count("<img:")
            if not 1 <= count <= max_images or count in by_count:
                continue
            label = f"{count} object{'s' if count > 1 else ''}: {entry.get('text') or prompt}"
            try:
                by_count[count] = _example(prompt, image_root, label)
            except ValueError as err:  # PromptError: a missing or unreadable crop
                raise ValueError(f"examples {suite}, entry {entry.get('id', '?')}: {err}") from None
    return [by_count[count] for count in sorted(by_count)][:limit]


def compose_prompt(text: str, image_files: Sequence[str | None], max_images: int) -> list:
    """The prompt as parts (text and PIL images) for `MUMUPipeline.__call__`.

    `image_files[k]` is the file in slot k + 1 (None: empty). Raises `ValueError` naming the
    marker or slot: no text, a marker whose slot is empty or past the slots, an uploaded image
    that no marker places, more than `max_images` images, or a file that is not an image."""
    if not text or not text.strip():
        raise ValueError("write a prompt; put <image1>, <image2>, ... where the images go")
    used = [int(match.group(1)) for match in MARKER.finditer(text)]
    if len(used) > max_images:
        raise ValueError(f"the prompt places {len(used)} images; this model takes at most {max_images}")
    for slot in used:
        if not 1 <= slot <= len(image_files):
            raise ValueError(f"<image{slot}>: there are only {len(image_files)} image slots")
        if image_files[slot - 1] is None:
            raise ValueError(f"<image{slot}> has no image: upload one in slot {slot}")
    unplaced = [k + 1 for k, file in enumerate(image_files) if file is not None and k + 1 not in used]
    if unplaced:
        raise ValueError(f"image {unplaced[0]} is uploaded but the prompt has no <image{unplaced[0]}>")
    loaded: dict[int, Image.Image] = {}
    for slot in sorted(set(used)):
        try:
            loaded[slot] = load_image(image_files[slot - 1])
        except ImageLoadError as err:
            raise ValueError(f"image {slot} ({Path(image_files[slot - 1]).name}): {err.problem}") from None
    parts: list = []
    position = 0
    for match in MARKER.finditer(text):
        if match.start() > position:
            parts.append(text[position:match.start()])
        parts.append(loaded[int(match.group(1))])
        position = match.end()
    if position < len(text):
        parts.append(text[position:])
    return parts


def demo_theme():
    """The demo's Gradio theme, for `launch(theme=...)` (Gradio 6 takes it there): system fonts,
    since the default theme would load its fonts from a web font service."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def build_demo(pipe, *, max_images: int | None = None, examples: Sequence[Example] = ()):
    """The Gradio app for `pipe` (`max_images` slots, default the pipeline's limit), its controls
    set to the pipeline's `sampling_defaults`, with `examples` to click (`suite_examples`).
    `launch(theme=demo_theme(), allowed_paths=[the examples' folders])` it, or mount it in another app."""
    import gradio as gr
    import torch

    max_images = max_images or int(pipe.config.max_images)
    defaults = pipe.sampling_defaults
    sizes = pipe.trained_sizes
    multiple = int(pipe.size_multiple)

    def generate(text, *values):
        files, (steps, guidance, seed, size) = list(values[:max_images]), values[max_images:]
        try:
            parts = compose_prompt(text, [f if f else None for f in files], max_images)
            if int(size) % multiple:
                raise ValueError(f"size {int(size)}: must be a multiple of {multiple}")
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            image = pipe(parts, height=int(size), width=int(size), num_inference_steps=int(steps),
                         guidance_scale=float(guidance), generator=generator).images[0]
        except (ValueError, OSError) as err:
            raise gr.Error(str(err).splitlines()[0]) from None
        return image, [part for part in parts if isinstance(part, Image.Image)]

    with gr.Blocks(title="MUMU") as demo:
        gr.Markdown("## MUMU: images from multimodal prompts\nWrite the prompt with `<image1>`, `<image2>`, ... "
                    "where each image goes, and drop the images in their slots.")
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Prompt", value="a <image1> in the style of <image2>", elem_id="prompt")
                with gr.Row():
                    slots = [gr.File(label=f"image{k + 1}", file_types=["image"], type="filepath",
                                     elem_id=f"image{k + 1}") for k in range(max_images)]
                with gr.Row():
                    steps = gr.Slider(1, max(100, defaults.num_inference_steps), value=defaults.num_inference_steps,
                                      step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0.0, max(15.0, defaults.guidance_scale), value=defaults.guidance_scale,
                                         step=0.5, label="Guidance", elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    # Only the sizes the model was made for: another size draws what it never learned.
                    size = gr.Dropdown(choices=sizes, value=defaults.resolution, label="Size (px)", elem_id="size")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                usable = [e for e in examples if len(e.files) <= max_images]
                if usable:
                    gr.Examples(
                        examples=[[e.text, *e.files, *[None] * (max_images - len(e.files))] for e in usable],
                        inputs=[text, *slots], example_labels=[e.label for e in usable],
                        label="Examples (click one, then Generate)", elem_id="examples",
                    )
            with gr.Column():
                output = gr.Image(label="Output", type="pil", elem_id="output")
                crops = gr.Gallery(label="Conditioning images", columns=4, elem_id="crops")
        button.click(generate, inputs=[text, *slots, steps, guidance, seed, size], outputs=[output, crops])
    return demo
