"""The adapter: a non-causal transformer from the VLM's hidden states to SDXL's conditioning.

Idefics2's language model is causal, so a token only sees what precedes it; the adapter lets
every token see the whole prompt (an image placed before its word sees the word too) and
maps the VLM width to the UNet's cross-attention width (SDXL: 2048). It also produces the
pooled vector SDXL's UNet adds to its time embedding (`text_embeds`, SDXL: 1280), which
SDXL's second text encoder used to provide.

Two options, saved in the adapter's config (older adapters load with the defaults):
- `positions="rope"` rotates queries and keys by the token's place in the prompt. The causal LM
  carries order only implicitly; with it the adapter can tell the first crop from the second.
- `pooled="text"` averages only the text tokens into the pooled vector. The UNet adds that vector
  to every block's time embedding, everywhere in the image: averaged over image tokens too, it
  carries the crops' appearance as one global blend with no place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def rotary_tables(length: int, head_dim: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's (cos, sin) for positions 0..length-1, [length, head_dim], base 10,000."""
    inverse = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class AdapterBlock(nn.Module):
    """Pre-norm transformer block, bidirectional self-attention over the valid tokens."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class MUMUAdapter(ModelMixin, ConfigMixin):
    _no_split_modules = ["AdapterBlock"]

    @register_to_config
    def __init__(
        self,
        in_dim: int,
        width: int = 2048,
        num_layers: int = 16,
        num_heads: int = 16,
        cross_attention_dim: int = 2048,
        pooled_dim: int = 1280,
        mlp_ratio: float = 4.0,
        positions: str = "none",
        pooled: str = "all",
    ):
        super().__init__()
        if positions not in ("none", "rope"):
            raise ValueError(f"positions must be 'none' or 'rope', got {positions!r}")
        if pooled not in ("all", "text"):
            raise ValueError(f"pooled must be 'all' or 'text', got {pooled!r}")
        if positions == "rope" and (width // num_heads) % 2:
            raise ValueError(f"positions='rope' needs an even head width, got {width // num_heads}")
        self.proj_in = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList([AdapterBlock(width, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, cross_attention_dim)
        self.proj_pooled = nn.Linear(width, pooled_dim)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [B, L, in_dim], attention_mask [B, L] (1 = token, 0 = padding), image_mask
        [B, L] (True = an image token; needed when `pooled="text"`).

        Returns (prompt_embeds [B, L, cross_attention_dim], pooled_embeds [B, pooled_dim]).
        """
        valid = attention_mask.bool()
        if not valid.any(dim=1).all():
            raise ValueError("every prompt needs at least one token (the tokenizer's BOS)")
        key_mask = valid[:, None, None, :]  # broadcast over heads and queries
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        rotary = None
        if self.config.positions == "rope":
            rotary = rotary_tables(x.shape[1], self.config.width // self.config.num_heads, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, key_mask, rotary)
        x = self.norm_out(x)
        pooled_from = valid
        if self.config.pooled == "text":
            if image_mask is None:
                raise ValueError("an adapter with pooled='text' needs the image_mask of its tokens")
            # Every prompt has its BOS, a text token, so no row is left empty.
            pooled_from = valid & ~image_mask.bool()
        weights = pooled_from.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)
        return self.proj_out(x), self.proj_pooled(pooled)
