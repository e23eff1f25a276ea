"""Fine-grained Mixture-of-Experts with DeepSeek-V3's aux-loss-free (noaux_tc) routing.

Legend: T tokens (batch * sequence, flattened), D hidden size, E routed experts, X experts per group,
K experts per token (num_experts_per_tok), I expert width, G expert groups, S = T * K routed slots.

Router (SPEC section 3):

    s_TE      = sigmoid(x W_g^T)                          in fp32
    choice_TE = s_TE + bias_E                             bias only chooses, never weights
    groups    : keep the topk_group groups with the largest (sum of their top-2 choice scores);
                experts of the other groups get -inf (not 0: sigmoid scores plus a negative
                bias can be below 0, a 0 would still beat them)
    idx_TK    = top-K of choice_TE
    w_TK      = s_TE[idx] / (sum_K s_TE[idx] + 1e-20) * routed_scaling_factor   (norm_topk_prob)

Then the S routed (token, expert) slots are sorted by expert, the experts run as one
grouped GEMM over contiguous blocks (`GroupedExperts`, kept a separate module so expert
parallelism can wrap it with all-to-all dispatch/combine), and the outputs are weighted and
summed back per token, plus the shared experts applied to every token.

Load balancing without an auxiliary loss: each MoE layer counts the tokens routed to each
expert (training forwards only, once per forward: not in an activation-checkpointing
recomputation, model.recompute); after every optimizer step `update_expert_bias` moves the bias
by rate * sign(mean_load - load_e) and resets the counts.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kimi_train.kernels.grouped_gemm import grouped_gemm

from .config import ModelConfig
from .recompute import is_recomputing


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Fp32Buffers(nn.Module):
    """Keeps fp32 buffers fp32 under model.to(bf16): the router bias moves in 1e-3 steps that
    bf16 (8 mantissa bits) would round away, and token counts must stay exact."""

    def _apply(self, fn, recurse=True):
        fp32 = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, old in fp32.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = (new if old.is_meta else old).to(device=new.device, dtype=torch.float32)
        return self


class Router(_Fp32Buffers):
    """Sigmoid top-k router with a selection-only bias (noaux_tc) and group-limited routing."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        # fp32 always: the bias moves by 1e-3 steps that bf16 would round away.
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        with torch.no_grad():
            self.e_score_correction_bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (weights_TK fp32, expert indices_TK int64)."""
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under bf16 autocast
            scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        choice_TE = scores_TE.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            choice_TGX = rearrange(choice_TE, "t (g x) -> t g x", g=self.n_group)
            group_score_TG = choice_TGX.topk(min(2, choice_TGX.shape[-1]), dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = rearrange(choice_TGX.masked_fill(~keep_TG[:, :, None], float("-inf")), "t g x -> t (g x)")
        idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, idx_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return weights_TK * self.routed_scaling_factor, idx_TK


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D weights [E, out, in], run as grouped GEMMs.

    forward(x_SD sorted by expert, num_tokens_per_expert_E) -> y_SD. Expert e handles rows
    [offs[e-1], offs[e]) where offs = cumsum(num_tokens_per_expert). Experts with no tokens are
    empty blocks (their weights still get a zero gradient).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj, std=std)
        nn.init.normal_(self.up_proj, std=std)
        nn.init.normal_(self.down_proj, std=out_std)

    def forward(self, x_SD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        offs_E = torch.cumsum(num_tokens_per_expert_E, dim=0).to(torch.int32)
        w_gate, w_up, w_down = self.gate_proj, self.up_proj, self.down_proj
        device_type = x_SD.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast does not know grouped GEMMs: cast like it casts nn.Linear.
            dtype = torch.get_autocast_dtype(device_type)
            x_SD, w_gate, w_up, w_down = (t.to(dtype) for t in (x_SD, w_gate, w_up, w_down))
        # [E, out, in] -> [E, in, out] views: grouped_gemm computes x @ w per block.
        gate_SI = grouped_gemm(x_SD, w_gate.transpose(-2, -1), offs_E, backend=backend)
        up_SI = grouped_gemm(x_SD, w_up.transpose(-2, -1), offs_E, backend=backend)
        return grouped_gemm(F.silu(gate_SI) * up_SI, w_down.transpose(-2, -1), offs_E, backend=backend)


class MoE(_Fp32Buffers):
    """Routed experts (top-K of E) plus shared experts; replaces the MLP of layers >= first_k_dense_replace."""

    tokens_per_expert: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = GroupedExperts(E, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts: Optional[FeedForward] = None
        if cfg.n_shared_experts > 0:
            self.shared_experts = FeedForward(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        # Routed-token counts since the last bias update; fp32 so an all_reduce can sum them directly.
        # Read them through routed_counts(): each training forward appends its counts to _pending
        # (no op in the forward; see model.recompute) and the read folds them in.
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.float32))
        self._pending: list[torch.Tensor] = []

    def init_weights(self, std: float, out_std: float) -> None:
        self.gate.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.reset_counts()

    @torch.no_grad()
    def routed_counts(self) -> torch.Tensor:
        """counts_E fp32: the tokens routed to each expert by the training forwards since the last reset."""
        if self._pending:
            self.tokens_per_expert += torch.stack(self._pending).sum(dim=0).float()
            self._pending = []
        return self.tokens_per_expert

    @torch.no_grad()
    def reset_counts(self) -> None:
        self._pending = []
        self.tokens_per_expert.zero_()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        K = self.top_k
        weights_TK, idx_TK = self.gate(x_TD)

        with torch.no_grad():
            idx_S = rearrange(idx_TK, "t k -> (t k)")  # slot s = t * K + k: token t's k-th choice
            # scatter_add, not bincount: bincount syncs with the host on CUDA.
            num_tokens_per_expert_E = idx_S.new_zeros(self.num_experts).scatter_add_(0, idx_S, torch.ones_like(idx_S))
            if self.training and not is_recomputing():
                self._pending.append(num_tokens_per_expert_E)
            order_S = torch.argsort(idx_S, stable=True)  # the slots sorted by expert
            token_S = order_S // K

        y_sorted_SD = self.experts(x_TD[token_S], num_tokens_per_expert_E)
        # The shared experts before the routed output is read: under expert parallelism that
        # output may still be on the wire (parallel.expert_parallel returns its combine in flight).
        shared_TD = self.shared_experts(x_TD) if self.shared_experts is not None else None
        # Un-sort into slot order and take the weighted sum over each token's K slots
        # (deterministic, no atomics).
        y_SD = torch.empty_like(y_sorted_SD)
        y_SD[order_S] = y_sorted_SD
        y_TKD = rearrange(y_SD, "(t k) d -> t k d", k=K)
        y_TD = (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        return y_TD.view(shape)


def expert_counts(moe_layers: Sequence[MoE]) -> torch.Tensor:
    """counts_LE: every MoE layer's routed-token counts since the last bias update (this process's;
    a data-parallel caller sums them over its ranks before ``update_expert_bias``)."""
    return torch.stack([layer.routed_counts() for layer in moe_layers])


@torch.no_grad()
def update_expert_bias(moe_layers: Sequence[MoE], rate: float = 1e-3, counts_LE: Optional[torch.Tensor] = None) -> dict:
    """Aux-loss-free load balancing: bias_e += rate * sign(mean_load - load_e); keep mean(bias) = 0.

    counts_LE: the counts to balance, [num layers, E] (None: ``expert_counts(moe_layers)``, this
    process's). Under data parallelism every replica must apply the same update: pass the counts
    summed over the data-parallel ranks (the training engine does). Counts are reset.
    Returns {"imbalance_per_layer": [max/mean load],
    "max_imbalance", "mean_imbalance"} (1.0 = perfectly balanced; 0.0 for a layer with no tokens).
    """
    if not moe_layers:
        return {"imbalance_per_layer": [], "max_imbalance": 0.0, "mean_imbalance": 0.0}
    if counts_LE is None:
        counts_LE = expert_counts(moe_layers)
    imbalance = []
    for layer, counts_E in zip(moe_layers, counts_LE):
        mean = counts_E.mean()
        imbalance.append(float(counts_E.max() / mean) if mean > 0 else 0.0)
        bias_E = layer.gate.e_score_correction_bias
        bias_E += rate * torch.sign(mean - counts_E).to(bias_E.device, bias_E.dtype)
        bias_E -= bias_E.mean()
        layer.reset_counts()
    return {
        "imbalance_per_layer": imbalance,
        "max_imbalance": max(imbalance),
        "mean_imbalance": sum(imbalance) / len(imbalance),
    }
