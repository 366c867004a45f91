import subprocess
import sys

import pytest
from PIL import Image

from mumu_model.cli import main


def test_generate_writes_a_png(tiny_pipeline_dir, tmp_path, red_square, capsys):
    red_square.save(tmp_path / "red.png")
    out = tmp_path / "out" / "sample.png"
    code = main(["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a <img:red.png> circle",
                 "--image-root", str(tmp_path), "--out", str(out), "--steps", "3", "--quiet"])
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["sample.png"]  # no temp file left behind


def test_init_builds_a_loadable_pipeline(tmp_path):
    from mumu_model import MUMUPipeline

    out = tmp_path / "tiny"
    assert main(["init", "--profile", "tiny", "--set", "image_size=56", "--out", str(out)]) == 0
    assert MUMUPipeline.from_pretrained(out).tokens_per_image == 16
    assert main(["init", "--profile", "tiny", "--out", str(out)]) == 2  # refuses to overwrite


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "a <img:../etc/passwd> x"], "outside the allowed image root"),
        (["--prompt", "a <img:red.png x"], "unclosed image tag"),
        (["--prompt", "a <b> x"], "unknown tag"),
        (["--prompt", "a <img:nope.png>"], "nope.png"),
        (["--out", "x.unknownext"], "unknown image extension"),
    ],
)
def test_user_mistakes_are_one_line_errors(tiny_pipeline_dir, tmp_path, capsys, args, message):
    base = {"--model": str(tiny_pipeline_dir), "--prompt": "a dog", "--out": str(tmp_path / "o.png")}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["generate", "--steps", "1", "--quiet", "--image-root", str(tmp_path)]
    for flag, value in base.items():
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mumu: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()


def test_missing_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "o.png")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "a", "--out", str(tmp_path / "o.png")]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "mumu_model.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "init", "lora"):
        assert command in result.stdout
