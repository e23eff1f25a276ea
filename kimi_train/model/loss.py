"""The language-model loss: lm_head and the cross-entropy in one call, optionally over token chunks.

Legend: N tokens (batch x sequence, flattened), D hidden size, V vocabulary, C tokens per chunk.

    loss = linear_cross_entropy(h_ND, weight_VD, labels_N, chunk_tokens)   # mean over labels != -100

``chunk_tokens = 0`` is the plain path, ``F.cross_entropy(F.linear(h, w).float(), labels)``: it
keeps the N x V fp32 log-softmax for the backward (and the backward makes an N x V gradient).
``chunk_tokens = C > 0`` computes the same loss C tokens at a time and keeps only h, the weight
and one fp32 logsumexp per token; the backward recomputes each chunk's logits and forms its
gradient ``(softmax - onehot) * grad / n_valid`` (the per-token factor applied to the C x D
products), so at most one C x V block of logits (plus its fp32 copy) exists at any time, in the
forward or the backward. The extra cost is one more N x D x V matmul (the backward's recompute)
on top of the usual three: 1.1-1.2x the step time on CPU where lm_head dominates (docs/model.md).

Precision: the matmuls run in the autocast dtype when autocast is on (else in h's dtype), the
logsumexp, the loss and the weight-gradient accumulation in fp32, as the plain path does under
autocast (its logits are cast with ``.float()`` before the softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels equal to this are not predicted (padding, packed-document boundaries)


def linear_cross_entropy_reference(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The plain path: full logits, fp32 cross-entropy (mean over the labels != ignore_index)."""
    return F.cross_entropy(F.linear(h_ND, weight_VD).float(), labels_N, ignore_index=ignore_index)


def chunked_linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                                 chunk_tokens: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The same value and gradients as `linear_cross_entropy_reference`, never holding N x V logits."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be a positive number of tokens")
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(h_ND.dtype, weight_VD.dtype)
    return _ChunkedLinearCrossEntropy.apply(h_ND, weight_VD, labels_N, chunk_tokens, ignore_index, dtype)


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, chunk_tokens: int,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Chunked when chunk_tokens > 0, else the plain path (see the module docstring)."""
    if chunk_tokens == 0:
        return linear_cross_entropy_reference(h_ND, weight_VD, labels_N, ignore_index)
    return chunked_linear_cross_entropy(h_ND, weight_VD, labels_N, chunk_tokens, ignore_index)


def _chunk_logits(h_CD: torch.Tensor, w_VD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One chunk's logits in fp32, computed in `dtype`."""
    return (h_CD.to(dtype) @ w_VD.T).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, labels_N, chunk_tokens, ignore_index, dtype):
        N = h_ND.shape[0]
        valid_N = labels_N != ignore_index
        target_N = torch.where(valid_N, labels_N, 0)  # any index: ignored rows are masked out
        lse_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        with torch.autocast(h_ND.device.type, enabled=False):  # the casts are ours: `dtype`
            w_VD = weight_VD.to(dtype)
            for start in range(0, N, chunk_tokens):
                end = min(start + chunk_tokens, N)
                logits_CV = _chunk_logits(h_ND[start:end], w_VD, dtype)
                lse_C = torch.logsumexp(logits_CV, dim=-1)
                target_logit_C = logits_CV.gather(1, target_N[start:end, None]).squeeze(1)
                loss_sum += torch.where(valid_N[start:end], lse_C - target_logit_C, 0.0).sum()
                lse_N[start:end] = lse_C
        n_valid = valid_N.sum()  # 0 valid labels: 0 / 0 = nan, as F.cross_entropy
        ctx.save_for_backward(h_ND, weight_VD, target_N, valid_N, lse_N, n_valid)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        h_ND, weight_VD, target_N, valid_N, lse_N, n_valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, C, dtype = h_ND.shape[0], ctx.chunk_tokens, ctx.dtype
        # d loss / d logit[n, v] = (softmax[n, v] - onehot[n, v]) * s[n], s[n] = grad_loss / n_valid for a
        # valid n, else 0. s is a per-row factor, so it scales the C x D products, not the C x V block.
        row_scale_N1 = (valid_N.float() * (grad_loss.float() / n_valid))[:, None]
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        with torch.autocast(h_ND.device.type, enabled=False):
            w_VD = weight_VD.to(dtype)
            for start in range(0, N, C):
                end = min(start + C, N)
                h_CD = h_ND[start:end].to(dtype)
                grad_CV = _chunk_logits(h_CD, w_VD, dtype).sub_(lse_N[start:end, None]).exp_()  # softmax
                grad_CV.scatter_add_(1, target_N[start:end, None], grad_CV.new_full((end - start, 1), -1.0))
                grad_CV = grad_CV.to(dtype)
                scale_C1 = row_scale_N1[start:end]
                if need_h:
                    grad_h_ND[start:end] = (grad_CV @ w_VD) * scale_C1
                if need_w and dtype == torch.float32:
                    grad_w_VD.addmm_(grad_CV.T, h_CD * scale_C1)
                elif need_w:  # a low-precision product, accumulated in fp32
                    grad_w_VD += grad_CV.T @ (h_CD * scale_C1).to(dtype)
        if need_w:
            grad_w_VD = grad_w_VD.to(weight_VD.dtype)
        return grad_h_ND, grad_w_VD, None, None, None, None


__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "linear_cross_entropy_reference", "chunked_linear_cross_entropy"]
