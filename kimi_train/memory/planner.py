"""Activation memory per rank, from shapes: what each part of the model keeps for its backward.

Nothing is allocated, so ``model=k2`` answers at once. Every part is an explicit inventory, a
list of named saved tensors with their shapes and dtypes, read off the model code
(kimi_train/model/) and checked tensor by tensor against ``kimi_train.memory.counter`` (which
counts the storages a real forward leaves alive; tests/memory/test_planner.py)::

    plan = plan_activations(cfg, seq_len=4096, micro_batch_size=1, mode="selective", dtype="bf16", ep=16)
    plan.kept_bytes            # alive after the forward, on the most loaded rank
    plan.peak_bytes            # + the largest transient of the backward (see ActivationPlan)
    layer_inventory(cfg, moe=True, tokens=(1, 4096), mode="full")  # [Saved(name, shape, dtype)]

Parts: the embedding (the rotary cos/sin every layer keeps), one inventory per decoder-layer
kind (dense, MoE), and the logits path (final norm + lm_head + loss). A decoder layer is
charged for its own input (the previous layer's output, or the embedding's), the logits path
for the last layer's output. Parameters, gradients and optimizer state are not here (the
inspect tool counts them), nor is what the backward allocates besides recomputation.

Modes (``train.activation_checkpointing``; see `layer_inventory`):

- ``none``: what autograd saves.
- ``full``: the layer's input, the router's top-k outputs and, under EP, the all-to-all outputs.
- ``selective``: ``full`` plus every matmul output (nn.Linear, grouped GEMM) and the attention
  output and logsumexp, except the MLA up-projections (q_b_proj, kv_b_proj) and, with
  ``recompute_moe_down_proj``, the routed experts' down projection.

Precision (``dtype``):

- ``fp32``: everything fp32.
- ``bf16``, one process (autocast over fp32 weights): matmul outputs are bf16, the residual
  stream and the RMSNorm outputs stay fp32, so each nn.Linear fed an fp32 activation keeps its
  own bf16 copy of it (one per consumer: q_a_proj and kv_a_proj each keep one).
- ``bf16`` under FSDP2 (``bf16_params``: mixed precision hands the layers bf16 weights): the
  residual stream is bf16 and no per-consumer copies exist; each RMSNorm keeps an fp32 copy of
  its input.

In both bf16 cases RMSNorm statistics, router scores and logits, the attention logsumexp and
the loss's logsumexp stay fp32.

Legend: B micro-batch, T sequence, N = B*T tokens, D hidden size, H heads, Hkv GQA kv heads,
E head dim (GQA), Qk = qk_nope + qk_rope head dim, Dv v head dim, Lq q_lora_rank, L kv_lora_rank,
R qk_rope_head_dim, I dense width, Is shared-expert width, Ie expert width, X routed experts,
K experts per token, S = N*K routed slots this rank sends, Q routed slots this rank's experts
receive, V vocabulary, C loss chunk tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from kimi_train.model.config import ModelConfig
from kimi_train.config import ACTIVATION_CHECKPOINTING as MODES

DTYPES = ("fp32", "bf16")
BYTES = {"fp32": 4, "bf16": 2, "int64": 8, "int32": 4, "bool": 1}


@dataclass(frozen=True)
class Saved:
    """One tensor a part of the model keeps for its backward."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "fp32" | "bf16" | "int64" | "int32" | "bool"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BYTES[self.dtype]


@dataclass(frozen=True)
class Precision:
    """Which dtype each kind of tensor has (see the module docstring)."""

    act: str  # matmul outputs (and everything derived from them)
    resid: str  # the residual stream between layers
    autocast_copies: bool  # an nn.Linear fed an fp32 activation keeps its own bf16 copy

    @staticmethod
    def of(dtype: str, bf16_params: bool = False) -> "Precision":
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
        if dtype == "fp32":
            return Precision("fp32", "fp32", False)
        return Precision("bf16", "bf16", False) if bf16_params else Precision("bf16", "fp32", True)


def _rmsnorm(name: str, shape: tuple[int, ...], in_dtype: str, p: Precision,
             linears: tuple[str, ...] = (), fp32_reader: Optional[str] = None) -> list[Saved]:
    """An RMSNorm (norm.py) whose output feeds the nn.Linears ``linears`` (and ``fp32_reader``,
    the router, which reads it in fp32 with autocast off)."""
    out = [Saved(f"{name} input, fp32", shape, "fp32"),  # x.float(): x itself when x is fp32
           Saved(f"{name} rsqrt", (*shape[:-1], 1), "fp32"),
           Saved(f"{name} normalised ({in_dtype})", shape, in_dtype)]  # what the weight's grad reads
    out_dtype = "fp32" if p.resid == "fp32" else in_dtype  # weight * normalised: the weight's dtype wins
    copies = p.autocast_copies and out_dtype == "fp32"
    if copies:
        out += [Saved(f"{name} output, bf16 copy for {lin}", shape, "bf16") for lin in linears]
    if (linears and not copies) or (fp32_reader and out_dtype == "fp32"):
        out.append(Saved(f"{name} output", shape, out_dtype))
    if fp32_reader and out_dtype != "fp32":
        out.append(Saved(f"{name} output, fp32 copy for {fp32_reader}", shape, "fp32"))
    return out


def _mla(c: ModelConfig, B: int, T: int, p: Precision) -> list[Saved]:
    """MLAttention.forward under mode none (after input_layernorm)."""
    N, H, Qk, Dv, L, R, a = B * T, c.num_attention_heads, c.qk_head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim, p.act
    out: list[Saved] = []
    if c.q_lora_rank is not None:
        Lq = c.q_lora_rank
        out += _rmsnorm("q_a_layernorm", (N, Lq), a, p, linears=("q_b_proj",))
    if a == "fp32":  # kv_a_layernorm reads a view of the whole [c_kv | k_rope] output
        out += [Saved("kv_a_proj_with_mqa output [c_kv | k_rope]", (N, L + R), "fp32")]
        out += _rmsnorm("kv_a_layernorm", (N, L), a, p, linears=("kv_b_proj",))[1:]
    else:
        out += _rmsnorm("kv_a_layernorm", (N, L), a, p, linears=("kv_b_proj",))
    out += [Saved("q [nope | rope] (sdpa input)", (B, H, T, Qk), a),
            Saved("k [nope | rope expanded to H heads] (sdpa input)", (B, H, T, Qk), a)]
    if Qk > Dv:
        out.append(Saved("v zero-padded to the q/k head dim (sdpa input)", (B, H, T, Qk), a))
    else:  # v is a view of kv_b_proj's output, whose whole storage stays alive
        out.append(Saved("kv_b_proj output [k_nope | v] (v: sdpa input)", (N, H * (c.qk_nope_head_dim + Dv)), a))
    out += [Saved("sdpa output (head dim Qk: v was padded)", (B, H, T, max(Qk, Dv)), a),
            Saved("sdpa logsumexp", (B, H, T), "fp32"),
            Saved("o_proj input (sdpa output[..., :Dv], heads merged)", (N, H * Dv), a)]
    return out


def _gqa(c: ModelConfig, B: int, T: int, p: Precision) -> list[Saved]:
    """GQAttention.forward under mode none (after input_layernorm)."""
    N, H, Hkv, E, a = B * T, c.num_attention_heads, c.num_key_value_heads, c.gqa_head_dim, p.act
    return [Saved("q after rope (sdpa input)", (B, H, T, E), a),
            Saved("k after rope (sdpa input)", (B, Hkv, T, E), a),
            Saved("v_proj output (sdpa input)", (N, Hkv * E), a),
            Saved("sdpa output", (B, H, T, E), a),
            Saved("sdpa logsumexp", (B, H, T), "fp32"),
            Saved("o_proj input (heads merged)", (N, H * E), a)]


def _swiglu(name: str, rows: int, width: int, a: str) -> list[Saved]:
    """down(silu(gate(x)) * up(x)): what the SwiGLU keeps after its input (FeedForward, GroupedExperts)."""
    return [Saved(f"{name} gate_proj output", (rows, width), a), Saved(f"{name} up_proj output", (rows, width), a),
            Saved(f"{name} silu(gate)", (rows, width), a), Saved(f"{name} silu(gate) * up (down_proj input)", (rows, width), a)]


def routed_slots(c: ModelConfig, tokens: int, ep: int, imbalance: float) -> tuple[int, int]:
    """(S, Q): the routed slots this rank sends (tokens * K) and those its experts receive. Under EP
    the most loaded rank receives (1 + imbalance) times the balanced S; with ep = 1 a rank's experts
    receive exactly its own S, however unevenly the experts are loaded."""
    S = tokens * c.num_experts_per_tok
    return S, (S if ep == 1 else math.ceil(S * (1 + imbalance)))


def _moe(c: ModelConfig, N: int, p: Precision, ep: int, imbalance: float) -> list[Saved]:
    """MoE.forward under mode none (after post_attention_layernorm)."""
    X, K, a = c.n_routed_experts, c.num_experts_per_tok, p.act
    S, Q = routed_slots(c, N, ep, imbalance)
    out = [Saved("router sigmoid scores", (N, X), "fp32"), Saved("router top-k indices", (N, K), "int64")]
    if c.norm_topk_prob:
        out += [Saved("router gathered scores", (N, K), "fp32"), Saved("router score sum + 1e-20", (N, 1), "fp32")]
    out += [Saved(f"gate weights ({a}, the combine's)", (N, K), a),
            Saved("slot order (argsort by expert)", (S,), "int64"), Saved("token of each sorted slot", (S,), "int64")]
    if ep > 1:
        out += [Saved("received-slot permutation (EP)", (Q,), "int64"), Saved("its inverse (the un-permute)", (Q,), "int64"),
                Saved("local expert offsets", (X // ep,), "int32")]
    else:
        out += [Saved("expert offsets", (X,), "int32")]
    out += [Saved("routed slots x (grouped GEMM input)", (Q, c.hidden_size), a)]
    out += _swiglu("experts", Q, c.moe_intermediate_size, a)
    out += [Saved("routed outputs in slot order (combine input)", (S, c.hidden_size), a)]
    if c.n_shared_experts:
        out += _swiglu("shared_experts", N, c.moe_intermediate_size * c.n_shared_experts, a)
    return out


def _layer_none(c: ModelConfig, moe: bool, B: int, T: int, p: Precision, ep: int, imbalance: float) -> list[Saved]:
    N, D = B * T, c.hidden_size
    mla = c.attention_type == "mla"
    q_in = "q_proj" if not mla or c.q_lora_rank is None else "q_a_proj"
    attn_linears = (q_in, "kv_a_proj_with_mqa") if mla else ("q_proj", "k_proj", "v_proj")
    out = _rmsnorm("input_layernorm", (N, D), p.resid, p, linears=attn_linears)
    out += _mla(c, B, T, p) if mla else _gqa(c, B, T, p)
    if moe:
        shared = ("shared_experts.gate_proj", "shared_experts.up_proj") if c.n_shared_experts else ()
        out += _rmsnorm("post_attention_layernorm", (N, D), p.resid, p, linears=shared, fp32_reader="router")
        out += _moe(c, N, p, ep, imbalance)
    else:
        out += _rmsnorm("post_attention_layernorm", (N, D), p.resid, p, linears=("mlp.gate_proj", "mlp.up_proj"))
        out += _swiglu("mlp", N, c.intermediate_size, p.act)
    return out + _records(c, moe)


def _records(c: ModelConfig, moe: bool) -> list[Saved]:
    """Statistics the modules hold from each training forward, in every mode (constant, not activations)."""
    out = [Saved("max_logits record (QK-Clip)", (c.num_attention_heads,), "fp32")] if c.record_max_logits else []
    if moe:
        out.append(Saved("routed-token counts record (expert bias)", (c.n_routed_experts,), "int64"))
    return out


def _layer_stored(c: ModelConfig, moe: bool, B: int, T: int, p: Precision, mode: str, ep: int, imbalance: float,
                  recompute_moe_down_proj: bool) -> list[Saved]:
    """What the checkpoint stores for one decoder layer under ``full`` / ``selective``."""
    N, D, a = B * T, c.hidden_size, p.act
    S, Q = routed_slots(c, N, ep, imbalance)
    out = [Saved("layer input (checkpoint input)", (B, T, D), p.resid)]
    if moe:
        K = c.num_experts_per_tok
        out += [Saved("router top-k values", (N, K), "fp32"), Saved("router top-k indices", (N, K), "int64")]
        if c.n_group > 1:
            G = c.n_group
            per_group = min(2, c.n_routed_experts // G)
            out += [Saved("router per-group top-2 values", (N, G, per_group), "fp32"),
                    Saved("router per-group top-2 indices", (N, G, per_group), "int64"),
                    Saved("router group top-k values", (N, c.topk_group), "fp32"),
                    Saved("router group top-k indices", (N, c.topk_group), "int64")]
        if ep > 1:
            out += [Saved("EP count exchange", (ep, c.n_routed_experts // ep), "int64"),
                    Saved("EP dispatch all-to-all output (the norm output's dtype)", (Q, D), p.resid),
                    Saved("EP combine all-to-all output", (S, D), a)]
    out += _records(c, moe)
    if mode == "full":
        return out
    H = c.num_attention_heads
    if c.attention_type == "mla":
        Qk = c.qk_head_dim
        if c.q_lora_rank is None:
            out.append(Saved("q_proj output", (N, H * Qk), a))
        else:
            out.append(Saved("q_a_proj output", (N, c.q_lora_rank), a))
        out += [Saved("kv_a_proj_with_mqa output", (N, c.kv_lora_rank + c.qk_rope_head_dim), a),
                Saved("sdpa output", (B, H, T, max(Qk, c.v_head_dim)), a)]
    else:
        Hkv, E = c.num_key_value_heads, c.gqa_head_dim
        out += [Saved("q_proj output", (N, H * E), a), Saved("k_proj output", (N, Hkv * E), a),
                Saved("v_proj output", (N, Hkv * E), a), Saved("sdpa output", (B, H, T, E), a)]
    out += [Saved("sdpa logsumexp", (B, H, T), "fp32"), Saved("o_proj output", (N, D), a)]
    if moe:
        out.append(Saved("router logits", (N, c.n_routed_experts), "fp32"))
        Ie = c.moe_intermediate_size
        out += [Saved("experts gate output", (Q, Ie), a), Saved("experts up output", (Q, Ie), a)]
        if not recompute_moe_down_proj:
            out.append(Saved("experts down output", (Q, D), a))
        if c.n_shared_experts:
            Is = Ie * c.n_shared_experts
            out += [Saved("shared_experts gate_proj output", (N, Is), a), Saved("shared_experts up_proj output", (N, Is), a),
                    Saved("shared_experts down_proj output", (N, D), a)]
    else:
        I = c.intermediate_size
        out += [Saved("mlp gate_proj output", (N, I), a), Saved("mlp up_proj output", (N, I), a),
                Saved("mlp down_proj output", (N, D), a)]
    return out


def layer_inventory(c: ModelConfig, moe: bool, tokens: tuple[int, int], mode: str = "none", dtype: str = "fp32",
                    bf16_params: bool = False, ep: int = 1, imbalance: float = 0.0,
                    recompute_moe_down_proj: bool = False) -> list[Saved]:
    """The tensors one decoder layer (MoE or dense) keeps, for tokens = (B, T) on this rank."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}; valid: {', '.join(MODES)}")
    B, T = tokens
    p = Precision.of(dtype, bf16_params)
    if mode == "none":
        return _layer_none(c, moe, B, T, p, ep, imbalance)
    return _layer_stored(c, moe, B, T, p, mode, ep, imbalance, recompute_moe_down_proj)


def embedding_inventory(c: ModelConfig, tokens: tuple[int, int], dtype: str = "fp32", bf16_params: bool = False) -> list[Saved]:
    """The embedding keeps its token ids (the batch's, not counted); every layer's RoPE keeps cos/sin."""
    T = tokens[1]
    rope = c.qk_rope_head_dim if c.attention_type == "mla" else c.gqa_head_dim
    r = Precision.of(dtype, bf16_params).resid  # built in the embedding output's dtype
    return [Saved("rope cos", (T, rope // 2), r), Saved("rope sin", (T, rope // 2), r)]


def logits_inventory(c: ModelConfig, tokens: tuple[int, int], dtype: str = "fp32", bf16_params: bool = False,
                     loss_chunk_tokens: int = 0) -> list[Saved]:
    """Final norm + lm_head + cross-entropy. loss_chunk_tokens = 0: the plain path, which keeps the
    fp32 log-softmax [N, V]; C > 0: the chunked loss (model/loss.py), which keeps the final norm's
    output and one fp32 logsumexp per token (its chunk of logits is transient)."""
    B, T = tokens
    N, V, p = B * T, c.vocab_size, Precision.of(dtype, bf16_params)
    if loss_chunk_tokens:  # the chunked loss reads the norm output as it is, autocast off
        out = _rmsnorm("final norm", (N, c.hidden_size), p.resid, p, fp32_reader=None)
        out.append(Saved("final norm output (loss input)", (N, c.hidden_size), p.resid))
        return out + [Saved("loss targets", (N,), "int64"), Saved("loss target mask", (N,), "bool"),
                      Saved("loss logsumexp", (N,), "fp32"), Saved("loss valid-target count", (), "int64")]
    out = _rmsnorm("final norm", (N, c.hidden_size), p.resid, p, linears=("lm_head",))
    return out + [Saved("log-softmax of the fp32 logits", (N, V), "fp32"), Saved("nll_loss total weight", (), "fp32")]


def logits_transient_bytes(c: ModelConfig, tokens: int, dtype: str, loss_chunk_tokens: int,
                           bf16_params: bool = False) -> int:
    """What the loss's backward allocates on top of what is kept. Plain: the fp32 gradients of the
    log-probabilities and of the logits, [N, V] each (and the logits' bf16 gradient under bf16).
    Chunked: two chunks of fp32 logits (the next one is computed while the last is still bound),
    the bf16 matmul output under bf16, and the [N, D] gradient of the loss input."""
    bf16 = 2 if dtype == "bf16" else 0
    if not loss_chunk_tokens:
        return tokens * c.vocab_size * (8 + bf16)
    rows = min(loss_chunk_tokens, tokens)
    h_bytes = 4 if Precision.of(dtype, bf16_params).resid == "fp32" else 2
    return rows * c.vocab_size * (8 + bf16) + tokens * c.hidden_size * h_bytes


def total_bytes(items: list[Saved]) -> int:
    return sum(s.nbytes for s in items)


@dataclass
class ActivationPlan:
    """Activation bytes on one rank (the most loaded one under EP) for one micro-batch.

    kept_bytes = embedding + dense layers + MoE layers + logits path: alive when the forward ends.
    peak_bytes = kept_bytes + the larger of (a) the loss backward's transient and (b) under
    selective/full, one layer's recomputation (its `none` inventory, the largest layer kind): both
    happen at the start of the backward, when everything else is still alive. Not counted: the
    activation gradients the backward passes between ops, allocator fragmentation, communication
    buffers.
    """

    per_part: dict[str, int]  # bytes per part (all layers of a kind together)
    per_layer: dict[str, int]  # bytes of one layer of each kind, and of the logits path
    layers: dict[str, int]  # how many layers of each kind
    tokens: int
    recompute_bytes: int
    logits_transient_bytes: int
    kept_bytes: int = field(init=False)
    peak_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.kept_bytes = sum(self.per_part.values())
        self.peak_bytes = self.kept_bytes + max(self.recompute_bytes, self.logits_transient_bytes)

    def to_dict(self) -> dict:
        per_token = {k: round(v / self.tokens) for k, v in self.per_layer.items()}
        return {"kept_bytes": self.kept_bytes, "peak_bytes": self.peak_bytes, "per_part_bytes": self.per_part,
                "per_layer_bytes_per_token": per_token, "layers": self.layers,
                "recompute_bytes": self.recompute_bytes, "logits_transient_bytes": self.logits_transient_bytes}


def plan_activations(c: ModelConfig, seq_len: int, micro_batch_size: int = 1, mode: str = "none",
                     dtype: str = "fp32", bf16_params: bool = False, ep: int = 1, imbalance: float = 0.0,
                     recompute_moe_down_proj: bool = False, loss_chunk_tokens: Optional[int] = None) -> ActivationPlan:
    """Activation bytes per rank for one micro-batch of ``micro_batch_size`` x ``seq_len`` tokens,
    every decoder layer on the rank (no pipeline stages).

    loss_chunk_tokens: None reads ``model.loss_chunk_tokens`` (0, the plain loss, where the config
    has no such field). imbalance: the MoE margin, see `routed_slots`. bf16_params: FSDP2's bf16
    mixed precision (more than one rank), see `Precision`.
    """
    if imbalance < 0:
        raise ValueError(f"moe_imbalance={imbalance!r}: must be >= 0")
    if loss_chunk_tokens is None:
        loss_chunk_tokens = int(getattr(c, "loss_chunk_tokens", 0) or 0)
    tokens = (micro_batch_size, seq_len)
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    layers = {"dense": c.num_hidden_layers - n_moe, "moe": n_moe}
    kw = dict(dtype=dtype, bf16_params=bf16_params, ep=ep, imbalance=imbalance)
    per_layer, recompute = {}, 0
    for kind in ("dense", "moe"):
        if not layers[kind]:
            continue
        per_layer[kind] = total_bytes(layer_inventory(c, kind == "moe", tokens, mode,
                                                      recompute_moe_down_proj=recompute_moe_down_proj, **kw))
        if mode != "none":
            recompute = max(recompute, total_bytes(layer_inventory(c, kind == "moe", tokens, "none", **kw)))
    per_layer["logits"] = total_bytes(logits_inventory(c, tokens, dtype, bf16_params, loss_chunk_tokens))
    per_part = {"embedding": total_bytes(embedding_inventory(c, tokens, dtype, bf16_params))}
    per_part.update({kind: per_layer[kind] * layers[kind] for kind in ("dense", "moe") if layers[kind]})
    per_part["logits"] = per_layer["logits"]
    return ActivationPlan(per_part, per_layer, layers, seq_len * micro_batch_size, recompute,
                          logits_transient_bytes(c, seq_len * micro_batch_size, dtype, loss_chunk_tokens, bf16_params))


def per_token_table(c: ModelConfig, seq_len: int, dtype: str = "fp32") -> dict[str, dict[str, float]]:
    """Bytes per token of one sequence, by part and mode, for benchmarks/activation_memory_bench.py:
    {"dense layer" | "MoE layer": {"none" | "selective" | "selective+down" | "full": bytes},
     "logits path": {"plain": bytes, "chunked": bytes (model.loss_chunk_tokens, 1024 where unset)}}.
    A layer is charged for its input, as in a model (where the input requires grad)."""
    modes = {"none": ("none", False), "selective": ("selective", False), "selective+down": ("selective", True),
             "full": ("full", False)}
    out: dict[str, dict[str, float]] = {}
    for kind, moe in (("dense layer", False), ("MoE layer", True)):
        out[kind] = {name: total_bytes(layer_inventory(c, moe, (1, seq_len), mode, dtype,
                                                       recompute_moe_down_proj=down)) / seq_len
                     for name, (mode, down) in modes.items()}
    chunk = int(getattr(c, "loss_chunk_tokens", 0) or 1024)
    out["logits path"] = {name: total_bytes(logits_inventory(c, (1, seq_len), dtype, loss_chunk_tokens=n)) / seq_len
                          for name, n in (("plain", 0), ("chunked", chunk))}
    return out


__all__ = ["ActivationPlan", "MODES", "Saved", "embedding_inventory", "layer_inventory", "logits_inventory", "per_token_table",
           "plan_activations", "routed_slots", "total_bytes"]
