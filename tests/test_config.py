import pytest

from mumu_model.config import PROFILES, load_model_config


def test_paper_profile_matches_the_paper():
    paper = PROFILES["paper"]
    assert paper.encoder == "HuggingFaceM4/idefics2-8b"
    assert paper.sdxl == "stabilityai/stable-diffusion-xl-base-1.0"
    assert paper.tokens_per_image == 324  # 18x18 patches at 252 px
    assert paper.adapter_layers == 16
    assert paper.max_images == 4


def test_overrides_parse_types_and_none(tmp_path):
    config = load_model_config("paper", ["encoder=/models/idefics2", "image_size=504", "sdxl=none"])
    assert config.encoder == "/models/idefics2"
    assert config.sdxl is None
    assert config.tokens_per_image == 1296  # stage 2: 36x36 patches at 504 px


def test_yaml_file_names_its_profile(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("profile: tiny\nadapter_layers: 3\n")
    config = load_model_config("paper", {"seed": 7}, path)
    assert config.encoder is None and config.adapter_layers == 3 and config.seed == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["image_size=250"], "multiple of 14"),
        (["adapter_width=100", "adapter_heads=16"], "divisible"),
        (["nope=1"], "unknown config field"),
        (["image_size"], "field=value"),
        (["image_size=big"], "expects"),
        (["dtype=float64"], "dtype"),
        (["prediction_type=sample"], "prediction_type must be epsilon or v_prediction"),
    ],
)
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_model_config("tiny", overrides)


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile"):
        load_model_config("huge")
