"""Exact per-head maximum attention logit, the quantity QK-Clip caps (SPEC section 2).

Legend: B batch, H query heads, Hkv key heads (H % Hkv == 0), G = H / Hkv, T sequence,
C query chunk, D q/k head dim.

    S_max[h] = max over b, and over causal pairs j <= i, of  softmax_scale * q[b,h,i] . k[b,h',j]

with h' = h // G the KV head of query head h. q and k are post-RoPE. The value is signed
(a head whose logits are all negative reports a negative max) and exact: the log-sum-exp
that flash attention keeps is only an upper bound (max <= lse <= max + ln T).

Without a fused kernel we recompute the logits under no_grad, one block of C queries at a
time against the keys it can see (j < end of block), so the extra memory is O(B*H*C*T)
instead of O(B*H*T^2). On CUDA, `backend="auto"` uses the Triton kernel
kimi_train.kernels.max_logits_triton when it is importable.
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce


def per_head_max_logits_reference(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Brute force: the full [B, H, T, T] logits, masked, max [H]. For tests."""
    H, Hkv, T = q_BHTD.shape[1], k_BHTD.shape[1], q_BHTD.shape[2]
    k_BHTD = k_BHTD.repeat_interleave(H // Hkv, dim=1)
    s_BHTT = (q_BHTD.double() @ k_BHTD.double().transpose(-1, -2)) * softmax_scale
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=q_BHTD.device).tril()
    return s_BHTT.masked_fill(~causal_TT, float("-inf")).amax(dim=(0, 2, 3)).float()


def _chunked_max_logits(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, softmax_scale: float, chunk_size: int) -> torch.Tensor:
    H, T = q_BHTD.shape[1], q_BHTD.shape[2]
    Hkv = k_BHTD.shape[1]
    G = H // Hkv
    # Group the query heads by KV head (h = kv * G + g) so GQA needs no repeated keys.
    q_BKGTD = rearrange(q_BHTD.float(), "b (kv g) t d -> b kv g t d", kv=Hkv)
    k_BKTD = k_BHTD.float()
    max_H = torch.full((H,), float("-inf"), device=q_BHTD.device, dtype=torch.float32)
    pos_T = torch.arange(T, device=q_BHTD.device)
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        q_BKXD = rearrange(q_BKGTD[:, :, :, start:end], "b kv g c d -> b kv (g c) d")
        # Only keys j < end can be seen by this block of queries; of those, only the diagonal
        # block [start, end) has future keys to mask.
        s_BKGCJ = rearrange(q_BKXD @ k_BKTD[:, :, :end].transpose(-1, -2), "b kv (g c) j -> b kv g c j", g=G)
        future_CC = pos_T[None, start:end] > pos_T[start:end, None]
        s_BKGCJ[..., start:end].masked_fill_(future_CC, float("-inf"))
        max_H = torch.maximum(max_H, reduce(s_BKGCJ, "b kv g c j -> (kv g)", "max"))
    # The scale is positive, so it commutes with the max: one multiply on [H], not on the scores.
    return max_H * softmax_scale


@torch.no_grad()
def per_head_max_logits(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    softmax_scale: float,
    chunk_size: int = 128,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-head max causal logit [H] fp32 (max over batch, queries and visible keys).

    q: [B, H, T, D]; k: [B, Hkv, T, D] with H % Hkv == 0 (MLA passes k expanded to H heads).
    backend: "auto" (Triton on CUDA when importable, else "torch"), "torch" (chunked), "triton".
    """
    if q_BHTD.dim() != 4 or k_BHTD.dim() != 4 or q_BHTD.shape[1] % k_BHTD.shape[1]:
        raise ValueError(f"per_head_max_logits: q {tuple(q_BHTD.shape)} / k {tuple(k_BHTD.shape)} are not [B,H,T,D] / [B,Hkv,T,D]")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"per_head_max_logits backend={backend!r}; valid: 'auto', 'torch', 'triton'")
    if backend == "triton" or (backend == "auto" and q_BHTD.is_cuda):
        kernel = _triton_kernel()
        if kernel is not None:
            return kernel(q_BHTD, k_BHTD, softmax_scale)
        if backend == "triton":
            raise ValueError("per_head_max_logits backend='triton': kimi_train.kernels.max_logits_triton is not importable")
    with torch.autocast(q_BHTD.device.type, enabled=False):  # exact fp32 logits even under autocast
        return _chunked_max_logits(q_BHTD, k_BHTD, softmax_scale, max(1, int(chunk_size)))


_TRITON_KERNEL: list = []


def _triton_kernel():
    if not _TRITON_KERNEL:
        try:
            from kimi_train.kernels.max_logits_triton import max_logits_triton
        except Exception:  # no triton, no GPU, or the kernel module is absent
            max_logits_triton = None
        _TRITON_KERNEL.append(max_logits_triton)
    return _TRITON_KERNEL[0]


@torch.library.custom_op("kimi_train::per_head_max_logits", mutates_args=())
def per_head_max_logits_op(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, softmax_scale: float, chunk_size: int) -> torch.Tensor:
    """``per_head_max_logits`` as one opaque op, as the attention layers record it: activation
    checkpointing stores its [H] output instead of recomputing the O(T^2) scores (and replays the
    forward's ops one for one, which the chunked loop's data-dependent op count would not allow
    once the record is skipped in a recomputation), and torch.compile calls it as it is."""
    return per_head_max_logits(q_BHTD, k_BHTD, softmax_scale, chunk_size)


@per_head_max_logits_op.register_fake
def _(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, softmax_scale: float, chunk_size: int) -> torch.Tensor:
    return q_BHTD.new_empty(q_BHTD.shape[1], dtype=torch.float32)
