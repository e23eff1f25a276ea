"""ModelConfig: the Kimi-K2 / DeepSeek-V3 family in Hugging Face's field names, plus ours.

The dataclass is also the Hydra/OmegaConf schema of the ``model`` config group, so it
uses only OmegaConf-friendly types (int, float, str, bool, Optional, dict, list).
Named configs live in configs/model/NAME.yaml and are read by `load_model_config`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from kimi_train.paths import config_dir

ATTENTION_TYPES = ("mla", "gqa")


@dataclass
class ModelConfig:
    # --- Hugging Face DeepseekV3Config field names -----------------------------------
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384  # width of the dense SwiGLU MLP (first_k_dense_replace layers)
    moe_intermediate_size: int = 128  # width of one routed expert (and of one shared expert)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # gqa only; MLA has one latent shared by all heads
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP instead of MoE
    q_lora_rank: Optional[int] = None  # None: q_proj straight from the hidden state
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    head_dim: Optional[int] = None  # gqa only; None: hidden_size // num_attention_heads
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # --- ours ---------------------------------------------------------------------------
    attention_type: str = "mla"  # "mla" (Kimi K2 / DeepSeek-V3) or "gqa" (dense baselines; MHA when kv heads == heads)
    record_max_logits: bool = True  # record per-head max logits for QK-Clip during training forwards
    max_logits_chunk: int = 128  # query chunk of the no_grad max-logit computation (memory O(chunk * T))
    loss_chunk_tokens: int = 0  # > 0: lm_head + cross-entropy in chunks of this many tokens (model/loss.py); 0: full logits
    init_std: float = 0.02  # normal(0, init_std); output projections also / sqrt(2 * num_hidden_layers)

    # ---------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "ModelConfig":
        """Raise ValueError (one line naming the field) on an inconsistent config; return self."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"model.{name}={getattr(self, name)!r}: {why}")

        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "max_logits_chunk",
        ]  # fmt: skip
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
            bad("loss_chunk_tokens", "must be an integer >= 0 (0: the unchunked loss)")
        if self.attention_type not in ATTENTION_TYPES:
            bad("attention_type", f"valid values: {', '.join(ATTENTION_TYPES)}")
        if self.attention_type == "mla":
            for name in ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]:
                if getattr(self, name) <= 0:
                    bad(name, "must be a positive integer for MLA")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                bad("q_lora_rank", "must be a positive integer, or null for no q LoRA")
            if self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        else:
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                bad("num_key_value_heads", f"must be positive and divide num_attention_heads={self.num_attention_heads}")
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                bad("num_attention_heads", f"must divide hidden_size={self.hidden_size} (or set head_dim)")
            if self.gqa_head_dim <= 0 or self.gqa_head_dim % 2:
                bad("head_dim", "must be a positive even integer")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.n_routed_experts < 0:
            bad("n_routed_experts", "must be >= 0 (0: every layer dense)")
        if self.n_routed_experts > 0:
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be a positive integer")
            if self.n_shared_experts < 0:
                bad("n_shared_experts", "must be >= 0")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                bad("n_group", f"must be positive and divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be in [1, n_group={self.n_group}]")
            if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
                bad("num_experts_per_tok", "exceeds the experts left in the topk_group selected groups")
            if self.routed_scaling_factor <= 0:
                bad("routed_scaling_factor", "must be > 0")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be > 0")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be > 0")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            bad("init_std", "must be a finite number > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                bad("rope_scaling", "only {type: yarn, factor, original_max_position_embeddings, ...} or null is supported")
            if float(self.rope_scaling.get("factor", 0)) < 1:
                bad("rope_scaling", "yarn needs factor >= 1")
            if int(self.rope_scaling.get("original_max_position_embeddings", 0)) <= 0:
                bad("rope_scaling", "yarn needs original_max_position_embeddings > 0")
        return self


def _named_configs() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def load_model_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """Read configs/model/NAME.yaml (or a .yaml path), apply keyword overrides, validate.

    >>> cfg = load_model_config("tiny", num_hidden_layers=2)
    """
    path = config_dir() / "model" / f"{name_or_path}.yaml"
    if str(name_or_path).endswith((".yaml", ".yml")):
        path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown model config {name_or_path!r}; valid: {', '.join(_named_configs())} or a .yaml path")
    raw = yaml.safe_load(path.read_text()) or {}
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # e.g. Hydra's _target_/_self_
    return model_config_from_dict({**raw, **overrides}, source=str(path))


def model_config_from_dict(d: dict[str, Any], source: str = "model config") -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; see kimi_train/model/config.py")
    return ModelConfig(**d).validate()


__all__ = ["ModelConfig", "load_model_config", "model_config_from_dict", "ATTENTION_TYPES"]
