"""The `mumu` command line: generate, demo, init, train, lora merge, and the subcommands other
packages register under the `mumu.commands` entry points (`mumu eval`, from the `eval` package).

User mistakes (a malformed prompt, a missing model folder, a bad option) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch


# The entry-point group of subcommand plugins (pyproject.toml: [project.entry-points."mumu.commands"]).
COMMAND_PLUGINS = "mumu.commands"


class UsageError(ValueError):
    """A mistake of the user's, reported in one line."""


def pipeline_size_multiple(folder: str | os.PathLike) -> int | None:
    """What a pipeline folder's output height and width must be multiples of, read from its VAE
    and UNet configs without loading weights (the pipeline checks the same once loaded).

    None when the folder does not say (a hub id, a missing or unreadable config).
    """
    from .loading import folder_size_multiple

    return folder_size_multiple(folder)


def check_sampling(
    steps: int | None, guidance: float | None, sizes: Mapping[str, int | None],
    pipeline_dir: str | os.PathLike | None,
) -> None:
    """Refuse sampling settings no pipeline accepts, before one is loaded.

    `steps` and `guidance` None, and a size None in `sizes` (which maps a flag, e.g. "--height",
    to its value), are the pipeline's own sampling defaults.
    """
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be at least 1")
    if guidance is not None and (not math.isfinite(guidance) or guidance < 0):
        raise UsageError(f"--guidance {guidance}: must be a number >= 0 (values <= 1 turn guidance off)")
    multiple = pipeline_size_multiple(pipeline_dir) if pipeline_dir is not None else None
    for flag, value in sizes.items():
        if value is None:
            continue
        if value < 1:
            raise UsageError(f"{flag} {value}: must be a positive number of pixels")
        if multiple is not None and value % multiple:
            raise UsageError(f"{flag} {value}: this model's output sides must be multiples of {multiple}")


def check_output_file(flag: str, path: Path) -> None:
    """Refuse an output file that could not be written: a folder, or under a path that is a file
    or not writable (missing folders are created)."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'sample.png'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {parent}")


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """`resolve_device_dtype` of a command's `--device` and `--dtype`; errors name the flag."""
    from .devices import resolve_device_dtype

    try:
        return resolve_device_dtype(args.device, args.dtype)
    except ValueError as err:  # "device 'gpu': ..." -> "--device 'gpu': ..."
        raise UsageError(f"--{err}") from None


def _may_be_hub_id(value: str) -> bool:
    """"org/name" is a hub id or a relative folder; a path that is not there is only the former."""
    return value.count("/") == 1 and not value.startswith((".", "/", "~"))


def _pipeline_source(model: str) -> str:
    """A local pipeline folder, checked complete without loading it, or a hub id."""
    from .loading import PipelineFolderError, check_pipeline_folder

    path = Path(model)
    if path.exists():
        try:
            check_pipeline_folder(path)
        except PipelineFolderError as err:
            raise UsageError(f"--model: {err}") from None
        return str(path)
    if _may_be_hub_id(model):
        return model  # a hub id, for users who have network access
    raise UsageError(f"--model {model}: no such folder")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """`load_pipeline` of `--model`, its errors naming the flag."""
    from .loading import PipelineFolderError, load_pipeline

    source = _pipeline_source(model)
    try:
        return load_pipeline(source, device, dtype)
    except PipelineFolderError as err:
        first = _first_line(err.__cause__ if err.__cause__ is not None else err)
        if not Path(model).exists():  # "outputs/typo" is taken for a hub id, and is more likely a typo
            raise UsageError(f"--model {model}: no such folder (as a hub id: {first})") from err
        raise UsageError(f"--model {model}: cannot load the pipeline: {first}") from err


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

    # Check everything before loading the model, so a mistake fails at once; the pipeline checks
    # the number of images against its own limit.
    device, dtype = device_and_dtype(args)
    source = _pipeline_source(args.model)
    check_sampling(args.steps, args.guidance, {"--height": args.height, "--width": args.width},
                   source if Path(source).is_dir() else None)
    out = Path(args.out)
    image_format = _image_format(out)
    check_output_file("--out", out)
    image_root = Path(args.image_root)
    if not image_root.is_dir():
        raise UsageError(f"--image-root {image_root}: no such folder")
    prompt = MultimodalPrompt.from_text(args.prompt, image_root, max_images=None)
    negative = None
    if args.negative_prompt is not None:
        negative = MultimodalPrompt.from_text(args.negative_prompt, image_root, max_images=None)
    if args.quiet:
        _silence_libraries()
    pipe = _load_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    # What the flags leave out, the model's own sampling defaults give (saved with the pipeline).
    defaults = pipe.sampling_defaults
    steps = defaults.num_inference_steps if args.steps is None else args.steps
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        negative_prompt=negative,
        generator=generator,
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    write_bytes_atomic(out, buffer.getvalue())
    print(f"wrote {out} ({image.width}x{image.height}, {steps} steps, guidance {guidance}, seed {args.seed}, "
          f"{device} {str(dtype).removeprefix('torch.')})")


def cmd_init(args: argparse.Namespace) -> None:
    from .atomic import atomic_dir
    from .build import build_pipeline
    from .config import load_model_config

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file")
    config = load_model_config(args.profile, args.set, args.config)
    for field in ("encoder", "sdxl", "vae"):  # checkpoints: a local folder or a hub id
        value = getattr(config, field)
        if value is not None and not Path(value).exists() and not _may_be_hub_id(value):
            raise UsageError(f"config field {field}={value}: no such folder")
    try:
        pipe = build_pipeline(config)
    except OSError as err:  # a hub id that cannot be fetched, a folder without the expected files
        raise UsageError(f"--profile {args.profile}: cannot load its checkpoints: {_first_line(err)}") from err
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
    print(
        f"wrote {out}: profile {args.profile}, {config.tokens_per_image} tokens per image "
        f"({config.image_size} px), at most {config.max_images} images per prompt, "
        f"{config.adapter_layers}-layer adapter"
    )


def _check_unet_folder(flag: str, value: str) -> None:
    """An SDXL UNet folder, or a pipeline folder with a unet/ subfolder, with safetensors weights."""
    path = Path(value)
    if not path.exists():
        raise UsageError(f"{flag} {value}: no such folder")
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: not a folder (give an SDXL pipeline or UNet folder)")
    unet = path / "unet" if (path / "unet").is_dir() else path
    if not (unet / "config.json").is_file():
        raise UsageError(f"{flag} {value}: not a UNet folder (no config.json, nor unet/config.json)")
    if not any(unet.glob("*.safetensors")):
        # Never fall back to pickle weights, which can run code when loaded.
        raise UsageError(f"{flag} {value}: no .safetensors weights in {unet}")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from .lora import merge_lora_into_pipeline, resolve_lora_file

    # Every input is checked before the (large) UNet and pipeline are loaded.
    _pipeline_source(args.model)
    if not Path(args.lora).exists():
        raise UsageError(f"--lora {args.lora}: no such file or folder")
    try:
        resolve_lora_file(args.lora)
    except ValueError as err:
        raise UsageError(f"--lora {args.lora}: {err}") from None
    _check_unet_folder("--unet", args.unet)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if not math.isfinite(args.scale):
        raise UsageError(f"--scale {args.scale}: must be a finite number")
    _silence_libraries()  # their warnings would bury the one line a mistake ends with
    try:
        merge_lora_into_pipeline(args.model, args.lora, args.unet, args.out, scale=args.scale)
    except (OSError, ValueError, KeyError) as err:  # unreadable weights, mismatched architectures
        raise UsageError(f"cannot merge: {_first_line(err)}") from err
    print(f"wrote {args.out}: {args.model} with UNet {args.unet} + LoRA {args.lora} (scale {args.scale})")


def cmd_train(args: argparse.Namespace) -> None:
    if not Path(args.config).is_file():
        raise UsageError(f"{args.config}: no such config file")
    if args.world_size is not None:
        if not args.dry_run:
            raise UsageError("--world-size is only used with --dry-run (a real run takes torchrun's)")
        if args.world_size < 1:
            raise UsageError(f"--world-size {args.world_size}: must be at least 1")
    if args.dry_run:
        from .training.config import load_train_config

        config = load_train_config(args.config, args.set)  # a bad config fails before the heavy import
        from .training.sizing import dry_run_report

        print(dry_run_report(config, world_size=args.world_size))
        return

    from .training.trainer import REQUEUE_EXIT_CODE, Preempted, TrainingDiverged, run

    overrides = [*args.set, "check_fit=false"] if args.skip_fit_check else args.set
    # The trainer's refusals (bad data, another run's checkpoint, an incomplete init_from, a
    # config that does not fit) are ValueErrors: main() ends them in one line, status 2.
    try:
        result = run(args.config, overrides, resume=args.resume)
    except TrainingDiverged as err:  # a run that went wrong, not a usage mistake: status 1
        print(f"mumu: training stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Preempted as err:  # checkpointed on SIGTERM: the launcher requeues on this status
        print(f"mumu: preempted: {err}", file=sys.stderr)
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    if result.pipeline_dir is not None:  # rank 0
        loss = f"loss {result.loss:.4f}" if result.loss is not None else "no new steps"
        print(f"trained {result.step} steps ({loss}): wrote {result.pipeline_dir}"
              + (f" and {result.unet_lora_dir}" if result.unet_lora_dir else ""))


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, resolved by `resolve_device_dtype`."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N, mps or auto (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line, like every other mistake (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"mumu: error: {message} (see {self.prog} --help)\n")


def _demo_examples(args: argparse.Namespace, max_images: int):
    """The demo's examples: from `--examples` suites, else the default suites when they are there."""
    from .demo import DEFAULT_EXAMPLE_SUITES, suite_examples

    if args.no_examples:
        return []
    paths = args.examples or ([DEFAULT_EXAMPLE_SUITES] if DEFAULT_EXAMPLE_SUITES.is_dir() else [])
    try:
        return suite_examples(paths, max_images)
    except ValueError as err:
        raise UsageError(f"--{err}") from None


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import build_demo, demo_theme
    from .loading import PipelineFolderError, check_pipeline_folder

    device, dtype = device_and_dtype(args)
    source = _pipeline_source(args.model)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: must be 1-65535")
    max_images = 4
    if Path(source).is_dir():
        try:
            max_images = int(json.loads((check_pipeline_folder(source) / "model_index.json").read_text())
                             .get("max_images", max_images))
        except (PipelineFolderError, ValueError, TypeError):
            pass  # the load below names the problem
    examples = _demo_examples(args, max_images)  # checked before the model loads
    # Gradio reports usage to its servers unless told not to; a local demo reaches no one.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the demo needs gradio: pip install gradio") from None
    pipe = _load_pipeline(source, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    defaults = pipe.sampling_defaults
    print(f"MUMU demo of {args.model} on http://{args.host}:{args.port} ({device}; {defaults.num_inference_steps} "
          f"steps, guidance {defaults.guidance_scale}, {defaults.resolution} px; {len(examples)} examples)", flush=True)
    folders = sorted({str(Path(file).parent) for example in examples for file in example.files})
    build_demo(pipe, examples=examples).launch(server_name=args.host, server_port=args.port, share=False,
                                               show_error=True, allowed_paths=folders, theme=demo_theme())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    generate.add_argument("--steps", type=int, default=None,
                          help="denoising steps (default: the model's saved sampling defaults, else the paper's 50 DDIM)")
    generate.add_argument("--guidance", type=float, default=None,
                          help="guidance scale (default: the model's saved sampling defaults, else the paper's 6)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=int, default=None,
                          help="default: the model's saved resolution, else its native size")
    generate.add_argument("--width", type=int, default=None,
                          help="default: the model's saved resolution, else its native size")
    add_device_arguments(generate)
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="a web app to try a pipeline (Gradio)",
                               description="Write a prompt with <image1>, <image2>, ... where images go.")
    demo.add_argument("--model", required=True, help="MUMU pipeline folder (or hub id)")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--examples", action="append", default=[], metavar="SUITE",
                      help="a prompt suite (YAML) or a folder of them to take clickable examples from, "
                           "one per number of images (default: the toy world's validation suites)")
    demo.add_argument("--no-examples", action="store_true", help="show no examples")
    add_device_arguments(demo)
    demo.set_defaults(func=cmd_demo)

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
    train.add_argument("--dry-run", action="store_true",
                       help="check the config, print its sizing report and train nothing")
    train.add_argument("--world-size", type=int, default=None, metavar="N",
                       help="with --dry-run: size the run for N processes")
    train.add_argument("--skip-fit-check", action="store_true",
                       help="train even when the memory estimate says the run does not fit the GPU (check_fit=false)")
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

    # Packages that add commands (the `eval` package adds `mumu eval`) register, under this
    # entry-point group, a function that takes the subparsers; the library imports none of them.
    for entry_point in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda e: e.name):
        entry_point.load()(commands)
    return parser


def one_line(err: BaseException) -> str:
    """An error message on one line (a library's message may span several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    # Usage mistakes (UsageError, PromptError), and config and argument validation in the library.
    except ValueError as err:
        print(f"mumu: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mumu: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
