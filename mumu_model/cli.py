"""The `mumu` command line.

User mistakes (a malformed prompt, a missing model folder, a bad option) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image


class UsageError(Exception):
    """A mistake of the user's, reported in one line."""


def _pipeline_source(model: str) -> str:
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"--model {model}: not a MUMU pipeline folder (no model_index.json)")
        return str(path)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id, for users who have network access
    raise UsageError(f"--model {model}: no such folder")


def _load_pipeline(model: str):
    from .pipeline import MUMUPipeline

    source = _pipeline_source(model)
    try:
        return MUMUPipeline.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {model}: cannot load the pipeline: {first_line}") from err


def _silence_libraries() -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()


def _image_format(out: Path) -> str:
    extension = out.suffix.lower()
    formats = Image.registered_extensions()
    if extension not in formats:
        raise UsageError(f"--out {out}: unknown image extension {extension or '(none)'!r}; use .png")
    return formats[extension]


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from .atomic import write_bytes_atomic
    from .prompt import MultimodalPrompt

    out = Path(args.out)
    image_format = _image_format(out)
    image_root = Path(args.image_root)
    # Parse before loading the model, so a bad prompt fails at once; the pipeline checks the
    # number of images against its own limit.
    prompt = MultimodalPrompt.from_text(args.prompt, image_root, max_images=None)
    negative = None
    if args.negative_prompt is not None:
        negative = MultimodalPrompt.from_text(args.negative_prompt, image_root, max_images=None)
    if args.quiet:
        _silence_libraries()
    pipe = _load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=args.quiet)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=negative,
        generator=generator,
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    write_bytes_atomic(out, buffer.getvalue())
    print(f"wrote {out} ({image.width}x{image.height}, {args.steps} steps, guidance {args.guidance}, seed {args.seed})")


def cmd_init(args: argparse.Namespace) -> None:
    from .atomic import atomic_dir
    from .build import build_pipeline
    from .config import load_model_config

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
    config = load_model_config(args.profile, args.set, args.config)
    pipe = build_pipeline(config)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
    print(
        f"wrote {out}: profile {args.profile}, {config.tokens_per_image} tokens per image "
        f"({config.image_size} px), at most {config.max_images} images per prompt, "
        f"{config.adapter_layers}-layer adapter"
    )


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from .lora import merge_lora_into_pipeline

    _pipeline_source(args.model)
    for flag, value in (("--lora", args.lora), ("--unet", args.unet)):
        if not Path(value).exists():
            raise UsageError(f"{flag} {value}: no such file or folder")
    merge_lora_into_pipeline(args.model, args.lora, args.unet, args.out, scale=args.scale)
    print(f"wrote {args.out}: {args.model} with UNet {args.unet} + LoRA {args.lora} (scale {args.scale})")


def cmd_train(args: argparse.Namespace) -> None:
    from .training.trainer import TrainingDiverged, run

    if not Path(args.config).is_file():
        raise UsageError(f"{args.config}: no such config file")
    try:
        result = run(args.config, args.set, resume=args.resume)
    except TrainingDiverged as err:  # a run that went wrong, not a usage mistake: status 1
        print(f"mumu: training stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if result.pipeline_dir is not None:  # rank 0
        loss = f"loss {result.loss:.4f}" if result.loss is not None else "no new steps"
        print(f"trained {result.step} steps ({loss}): wrote {result.pipeline_dir}"
              + (f" and {result.unet_lora_dir}" if result.unet_lora_dir else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mumu", description="MUMU: generate images from multimodal prompts (text with images inline)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="generate an image from a multimodal prompt",
        description="Prompt syntax: text with <img:PATH> image references, '<<' for a literal '<' "
        "(docs/prompt_format.md). Example: 'a <img:dog.png> dog in a <img:cartoon.png> style'.",
    )
    generate.add_argument("--model", required=True, help="MUMU pipeline folder (or hub id)")
    generate.add_argument("--prompt", required=True, help="multimodal prompt in text form")
    generate.add_argument("--out", required=True, help="output image file, e.g. out.png")
    generate.add_argument("--image-root", default=".", help="folder image paths are relative to and confined to")
    generate.add_argument("--negative-prompt", default=None, help="unconditional branch (default: the empty prompt)")
    generate.add_argument("--steps", type=int, default=50, help="denoising steps (paper: 50 DDIM)")
    generate.add_argument("--guidance", type=float, default=6.0, help="guidance scale (paper: 6)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=int, default=None, help="default: the model's native size")
    generate.add_argument("--width", type=int, default=None, help="default: the model's native size")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(func=cmd_generate)

    init = commands.add_parser(
        "init",
        help="build a pipeline folder from a profile (paper: load checkpoints; tiny: random weights)",
    )
    init.add_argument("--profile", default="tiny", help="paper or tiny")
    init.add_argument("--config", default=None, help="YAML file of config fields (may name its profile)")
    init.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a config field, e.g. --set encoder=/models/idefics2-8b --set image_size=504",
    )
    init.add_argument("--out", required=True, help="folder to write the pipeline to")
    init.add_argument("--overwrite", action="store_true")
    init.set_defaults(func=cmd_init)

    train = commands.add_parser(
        "train",
        help="train MUMU from a YAML config (torchrun-compatible: FSDP2 over the processes)",
        description="Train (or resume) a MUMU run. Fields: mumu_model/training/config.py (TrainConfig). "
        "Multi-process: torchrun --nproc_per_node=N -m mumu_model.training CONFIG.yaml",
    )
    train.add_argument("config", help="YAML file of TrainConfig fields, e.g. configs/train_tiny.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override a config field, e.g. --set max_steps=100 --set shards=data/captions/stage1",
    )
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (output_dir/checkpoints/step-N)")
    train.set_defaults(func=cmd_train)

    lora = commands.add_parser("lora", help="UNet LoRA tools").add_subparsers(dest="lora_command", required=True)
    merge = lora.add_parser(
        "merge",
        help="merge a MUMU UNet LoRA into another SDXL UNet (a community fine-tune)",
    )
    merge.add_argument("--model", required=True, help="MUMU pipeline folder (encoder, adapter, ...)")
    merge.add_argument("--lora", required=True, help="exported MUMU UNet LoRA (folder or .safetensors)")
    merge.add_argument("--unet", required=True, help="SDXL pipeline or UNet folder to merge into")
    merge.add_argument("--out", required=True, help="folder for the merged MUMU pipeline")
    merge.add_argument("--scale", type=float, default=1.0)
    merge.set_defaults(func=cmd_lora_merge)

    from eval.cli import add_eval_commands

    add_eval_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .prompt import PromptError

    try:
        args.func(args)
    except (UsageError, PromptError) as err:
        print(f"mumu: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # config and argument validation in the library
        print(f"mumu: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mumu: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
