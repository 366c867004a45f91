"""The adapter's options: token order (RoPE) and which tokens its pooled vector averages."""

import pytest
import torch

from mumu_model.adapter import MUMUAdapter
from mumu_model.config import load_model_config


def _adapter(**options) -> MUMUAdapter:
    torch.manual_seed(0)
    return MUMUAdapter(in_dim=16, width=32, num_layers=2, num_heads=4, cross_attention_dim=24, pooled_dim=8,
                       **options).eval()


def _swap_first_two(x: torch.Tensor) -> torch.Tensor:
    return x[:, [1, 0, *range(2, x.shape[1])]]


@torch.no_grad()
def test_without_positions_swapping_tokens_swaps_their_outputs():
    adapter = _adapter()
    hidden, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.long)
    embeds, pooled = adapter(hidden, mask)
    swapped, swapped_pooled = adapter(_swap_first_two(hidden), mask)
    assert torch.allclose(swapped, _swap_first_two(embeds), atol=1e-6)
    assert torch.allclose(swapped_pooled, pooled, atol=1e-6)


@torch.no_grad()
def test_rope_tells_the_first_token_from_the_second():
    adapter = _adapter(positions="rope")
    hidden, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.long)
    embeds, _ = adapter(hidden, mask)
    swapped, _ = adapter(_swap_first_two(hidden), mask)
    assert not torch.allclose(swapped, _swap_first_two(embeds), atol=1e-4)


@torch.no_grad()
def test_rope_keeps_a_prompt_unaffected_by_right_padding():
    adapter = _adapter(positions="rope")
    hidden = torch.randn(1, 4, 16)
    alone, _ = adapter(hidden, torch.ones(1, 4, dtype=torch.long))
    padded, _ = adapter(torch.cat([hidden, torch.randn(1, 3, 16)], 1), torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    assert torch.allclose(padded[:, :4], alone, atol=1e-5)


@torch.no_grad()
def test_pooled_text_ignores_the_image_tokens():
    adapter = _adapter(pooled="text")
    hidden, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.long)
    image_mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    _, pooled = adapter(hidden, mask, image_mask)
    # The pooled vector is the projected mean of the text tokens' final states.
    x = adapter.proj_in(hidden)
    for block in adapter.blocks:
        x = block(x, mask.bool()[:, None, None, :], None)
    x = adapter.norm_out(x)
    for row in range(2):
        text = ~image_mask[row]
        assert torch.allclose(pooled[row], adapter.proj_pooled(x[row][text].mean(0)), atol=1e-5)
    _, pooled_all = _adapter()(hidden, mask)
    assert not torch.allclose(pooled, pooled_all, atol=1e-4)


def test_pooled_text_needs_the_image_mask():
    adapter = _adapter(pooled="text")
    with pytest.raises(ValueError, match="image_mask"):
        adapter(torch.randn(1, 3, 16), torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("options, message", [({"positions": "learned"}, "positions"), ({"pooled": "image"}, "pooled")])
def test_unknown_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        _adapter(**options)


def test_an_adapter_saved_without_the_options_loads_with_the_old_behaviour(tmp_path):
    adapter = _adapter()
    adapter.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    stripped = config.replace('"positions": "none",', "").replace('"pooled": "all",', "")
    (tmp_path / "config.json").write_text(stripped)
    assert '"positions"' not in stripped and '"pooled"' not in stripped
    loaded = MUMUAdapter.from_pretrained(tmp_path)
    assert (loaded.config.positions, loaded.config.pooled) == ("none", "all")


def test_model_config_parses_the_options_and_booleans():
    config = load_model_config("tiny", ["image_token_norm=false", "adapter_positions=rope", "adapter_pooled=text"])
    assert (config.image_token_norm, config.adapter_positions, config.adapter_pooled) == (False, "rope", "text")
    assert load_model_config("tiny", ["image_token_norm=true"]).image_token_norm is True
    with pytest.raises(ValueError, match="image_token_norm"):
        load_model_config("tiny", ["image_token_norm=maybe"])
    with pytest.raises(ValueError, match="adapter_pooled"):
        load_model_config("tiny", ["adapter_pooled=image"])
