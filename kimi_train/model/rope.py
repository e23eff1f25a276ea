"""Rotary position embedding (RoPE) with optional YaRN context extension.

Legend: B batch, H heads, T sequence, D rotary dims (even), D2 = D / 2 frequency pairs.

Layout: "half-rotated" (the pair of frequency i is (x[i], x[i + D/2])), which is what
transformers' DeepseekV3 computes with ``rope_interleave=False``. DeepSeek's and Kimi's
released checkpoints use the interleaved layout (pairs (x[2i], x[2i+1])); the two are a
fixed permutation of the rope rows of q and k, applied by kimi_train.tools.hf on import/export
(`interleaved_to_half`). Attention logits are identical either way.

YaRN (arXiv 2309.00071), as DeepSeek-V3 uses it: frequencies whose wavelength fits the
original context many times (fast, > beta_fast rotations) are kept, slow ones
(< beta_slow rotations) are interpolated by 1/factor, with a linear ramp in between;
cos and sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the
softmax scale by mscale(factor, mscale_all_dim)^2 (see `yarn_softmax_scale_multiplier`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from einops import rearrange


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_softmax_scale_multiplier(rope_scaling: Optional[dict[str, Any]]) -> float:
    """softmax_scale *= mscale^2, DeepSeek's YaRN attention temperature (1.0 without YaRN)."""
    if not rope_scaling or not rope_scaling.get("mscale_all_dim"):
        return 1.0
    m = _yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
    return m * m


def rope_frequencies(dim: int, theta: float, rope_scaling: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [D2] fp32, cos/sin multiplier) for `dim` rotary dimensions."""
    inv_freq_D2 = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not rope_scaling:
        return inv_freq_D2, 1.0
    factor = float(rope_scaling["factor"])
    original_len = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast") or 32)
    beta_slow = float(rope_scaling.get("beta_slow") or 1)
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The rotary dim whose wavelength completes `num_rotations` turns over the original context.
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_D2 = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_D2 = 1 - ramp_D2  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq_D2 = inv_freq_D2 / factor * (1 - keep_D2) + inv_freq_D2 * keep_D2
    return inv_freq_D2, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for token positions (cheap: no cache to keep in sync).

    Positions [T] (one set for every sequence, e.g. arange(T)) give cos/sin [T, D2]; positions
    [B, T] (per sequence, e.g. restarting at each packed document) give [B, 1, T, D2], which
    broadcast over the heads of x_BHTD in `apply_rope`.
    """

    def __init__(self, dim: int, theta: float, rope_scaling: Optional[dict[str, Any]] = None):
        super().__init__()
        self.dim, self.theta, self.rope_scaling = dim, theta, rope_scaling
        inv_freq_D2, self.attention_factor = rope_frequencies(dim, theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq_D2, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after materialising from meta."""
        inv_freq_D2, _ = rope_frequencies(self.dim, self.theta, self.rope_scaling)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq_D2.to(self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.to(torch.float32)  # [T] or [B, T]; exact up to 2^24
        angles = pos[..., None] * self.inv_freq.to(device=pos.device, dtype=torch.float32)
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        if position_ids.dim() == 2:  # [B, T, D2] -> [B, 1, T, D2]: one angle per token, every head
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rope(x_BHTD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + D/2]) by angle pos * inv_freq[i] (half-rotated layout)."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    return torch.cat((x1 * cos_TD2 - x2 * sin_TD2, x2 * cos_TD2 + x1 * sin_TD2), dim=-1)


def interleaved_to_half(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Permute the last `dim`-row blocks of a weight [..., dim, in] from interleaved to half layout.

    Rows (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...): the interleaved pair (2i, 2i+1)
    becomes the half-rotated pair (i, i + D/2).
    """
    return rearrange(rows, "... (d2 pair) i -> ... (pair d2) i", d2=dim // 2)


def half_to_interleaved(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    return rearrange(rows, "... (pair d2) i -> ... (d2 pair) i", d2=dim // 2)
