"""A web demo of a MUMU pipeline: `mumu demo --model DIR` (Gradio, on 127.0.0.1 by default).

The user writes the prompt with `<image1>`, `<image2>`, ... where the images go ("a <image1>
man and his <image2> dog"), drops or uploads each image in its slot, and sets steps, guidance,
seed and size; the output is shown beside the images it was conditioned on. A mistake (an
empty slot that the prompt names, an image that cannot be read, too many images, no text)
is shown in the page as one line, and the app goes on serving.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from .images import ImageLoadError, load_image

MARKER = re.compile(r"<image(\d+)>")


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


def build_demo(pipe, *, max_images: int | None = None, default_size: int | None = None, max_size: int = 2048):
    """The Gradio app for `pipe` (`max_images` slots, default the pipeline's limit); `launch()`
    it, or mount it in another app."""
    import gradio as gr
    import torch

    max_images = max_images or int(pipe.config.max_images)
    native = default_size or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    multiple = int(pipe.vae_scale_factor)

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

    # System fonts: the default theme would load its fonts from a web font service.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="MUMU", theme=theme) as demo:
        gr.Markdown("## MUMU: images from multimodal prompts\nWrite the prompt with `<image1>`, `<image2>`, ... "
                    "where each image goes, and drop the images in their slots.")
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Prompt", value="a <image1> in the style of <image2>", elem_id="prompt")
                with gr.Row():
                    slots = [gr.File(label=f"image{k + 1}", file_types=["image"], type="filepath",
                                     elem_id=f"image{k + 1}") for k in range(max_images)]
                with gr.Row():
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                    guidance = gr.Slider(0.0, 15.0, value=6.0, step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    size = gr.Slider(multiple, max_size, value=native, step=multiple, label="Size")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                output = gr.Image(label="Output", type="pil", elem_id="output")
                crops = gr.Gallery(label="Conditioning images", columns=4, elem_id="crops")
        button.click(generate, inputs=[text, *slots, steps, guidance, seed, size], outputs=[output, crops])
    return demo
