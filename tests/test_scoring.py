import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from mumu_model.data.report import Skipped
from mumu_model.data.scoring import PickScorer, filter_by_score
from mumu_model.testing import tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny_pickscore"))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 32), (200, 30, 30)),
        Image.new("RGBA", (32, 32), (0, 90, 200, 128)),  # alpha: composited over black
        Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L"),
    ]


TEXTS = ["a man and a dog hiking", "a red square", "a blue square, watercolour style", "noise " * 100]


def test_score_is_pickscore_formula(clip_dir):
    scorer = PickScorer(str(clip_dir), batch_size=3)
    scores = scorer.score(TEXTS, images())
    assert scores.shape == (4,) and scores.dtype == np.float32

    # By hand, with the model and processor loaded independently, as in PickScore's README.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    for text, image, score in zip(TEXTS, images(), scores):
        rgb = image.convert("RGBA") if image.mode == "RGBA" else image.convert("RGB")
        if rgb.mode == "RGBA":  # MUMU composites transparency onto black
            black = Image.new("RGBA", rgb.size, (0, 0, 0, 255))
            rgb = Image.alpha_composite(black, rgb).convert("RGB")
        with torch.no_grad():
            text_inputs = processor(text=[text], padding=True, truncation=True, max_length=77, return_tensors="pt")
            t = model.get_text_features(**text_inputs).pooler_output
            i = model.get_image_features(**processor(images=[rgb], return_tensors="pt")).pooler_output
            expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(t, i)
        assert score == pytest.approx(float(expected), rel=1e-4, abs=1e-4)
    assert np.all(np.abs(scores) <= 100.0 + 1e-3)  # |cos| <= 1 times logit_scale.exp()


def test_score_does_not_depend_on_batch(clip_dir):
    together = PickScorer(str(clip_dir), batch_size=4).score(TEXTS, images())
    one_by_one = PickScorer(str(clip_dir), batch_size=1).score(TEXTS, images())
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)
    # A pair keeps its score when the pairs around it change.
    scorer = PickScorer(str(clip_dir), batch_size=8)
    reordered = scorer.score(TEXTS[::-1] + TEXTS[:1], images()[::-1] + images()[:1])
    np.testing.assert_allclose(reordered[:4][::-1], together, rtol=1e-5, atol=1e-5)
    assert reordered[4] == pytest.approx(together[0], abs=1e-5)


def test_unscorable_pairs_get_nan_and_are_counted(clip_dir):
    scorer = PickScorer(str(clip_dir))
    skipped = Skipped()
    scores = scorer.score(
        ["fine", None, "fine too"],
        [images()[0], images()[1], "not an image"],
        ids=["a", "b", "c"],
        skipped=skipped,
    )
    assert np.isfinite(scores[0]) and np.isnan(scores[1]) and np.isnan(scores[2])
    assert skipped.counts == {"unscorable": 2}
    with pytest.raises(ValueError, match="2 texts but 1 images"):
        scorer.score(["a", "b"], images()[:1])
    assert scorer.score([], []).shape == (0,)


def test_filter_by_score_keeps_rows_at_or_above_threshold():
    table = pd.DataFrame({"pair_id": list("abcde"), "score": [20.0, 21.5, 22.0, np.nan, 19.0]})
    kept, stats = filter_by_score(table, 21.5)
    assert list(kept["pair_id"]) == ["b", "c"]
    assert stats["rows_in"] == 5 and stats["rows_out"] == 2
    assert stats["rows_without_score"] == 1
    assert stats["kept_fraction"] == pytest.approx(0.4)
    assert stats["min_score"] == 21.5
    quantiles = stats["score_quantiles"]
    assert quantiles["q00"] == 19.0 and quantiles["q100"] == 22.0
    assert quantiles["q50"] == pytest.approx(np.median([20.0, 21.5, 22.0, 19.0]))
    assert list(quantiles) == ["q00", "q05", "q25", "q50", "q75", "q95", "q100"]


def test_filter_by_score_edge_cases():
    empty, stats = filter_by_score(pd.DataFrame({"score": []}), 0.0)
    assert empty.empty and stats["kept_fraction"] == 0.0 and stats["score_quantiles"] == {}
    with pytest.raises(ValueError, match="no 'score' column"):
        filter_by_score(pd.DataFrame({"x": [1]}), 0.0)
    with pytest.raises(ValueError, match="finite"):
        filter_by_score(pd.DataFrame({"score": [1.0]}), float("nan"))
