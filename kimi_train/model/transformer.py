"""KimiForCausalLM: the decoder stack. Module tree (and so state_dict keys) mirrors transformers'
DeepseekV3ForCausalLM:

    model.embed_tokens
    model.layers[i].{input_layernorm, self_attn, post_attention_layernorm, mlp}   # keyed by "i" (`DecoderLayers`)
    model.norm
    lm_head

Legend: B batch, T sequence, D hidden size, V vocabulary, D2 rotary pairs.

Forward (``KimiForCausalLM.forward(input_ids, labels=None, position_ids=None)``):

    logits_BTV = model(input_ids_BT)                      # no labels: the logits
    loss = model(input_ids_BT, labels=labels_BT)          # labels: the mean cross-entropy, fp32 scalar

``labels`` are already shifted (labels[:, t] is the target of position t: the trainer passes
``x = batch[:, :-1], y = batch[:, 1:]``); positions labelled -100 are ignored (the mean is over
the others). With labels the loss is computed inside ``lm_head``'s call (`LMHead`), so the FSDP2 /
ZeRO-3 hooks around lm_head gather its weight for it; with ``loss_chunk_tokens`` > 0 it goes over
chunks of that many tokens (kimi_train/model/loss.py) and the B x T x V logits never exist.
``position_ids`` ([T] or [B, T], default arange(T)) are the positions RoPE rotates by.

Initialisation (`init_weights`, deterministic under torch.manual_seed):
every matrix ~ normal(0, init_std), except the projections that write into the residual
stream (attention o_proj, the down_proj of dense MLPs, shared and routed experts), which use
init_std / sqrt(2 * num_hidden_layers) so the residual stream's variance stays O(1) with
depth (each layer adds two such branches: GPT-2's scheme). Norm weights are 1, router
biases 0. With pre-norm blocks and a final RMSNorm the logits are O(init_std * sqrt(D)).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from .attention import build_attention
from .config import ModelConfig
from .loss import linear_cross_entropy
from .moe import MoE, FeedForward
from .norm import RMSNorm
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.self_attn.name = f"layers.{layer_idx}.self_attn"
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(cfg)
        else:
            self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TD2, sin_TD2)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class DecoderLayers(nn.ModuleDict):
    """The decoder layers, keyed by their index in the whole model ("0", "1", ...): a subset (a
    pipeline stage's) keeps each layer's state-dict name. ``layers[i]`` takes an int or a str, and
    iterating yields the layers in model order, as over a ModuleList (``keys()`` gives the names)."""

    def __getitem__(self, key: int | str) -> nn.Module:
        return super().__getitem__(str(key))

    def __delitem__(self, key: int | str) -> None:
        super().__delitem__(str(key))

    def __contains__(self, key: int | str) -> bool:
        return super().__contains__(str(key))

    def __iter__(self):
        return iter(self.values())


class KimiModel(nn.Module):
    """Embedding, decoder layers and the final norm (transformers' `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = DecoderLayers({str(i): DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rope_dim = cfg.qk_rope_head_dim if cfg.attention_type == "mla" else cfg.gqa_head_dim
        self.rotary_emb = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids_BT: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final hidden states [B, T, D]; position_ids [T] or [B, T] (default arange(T))."""
        return self.norm(self.decode(self.embed_tokens(input_ids_BT), self.layers.values(), position_ids))

    def decode(self, h_BTD: torch.Tensor, layers, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states [B, T, D] through ``layers`` (decoder layers, in model order): all of them
        in ``forward``, a pipeline stage's in kimi_train/parallel/pipeline.py."""
        if position_ids is None:
            position_ids = torch.arange(h_BTD.shape[1], device=h_BTD.device)
        cos_TD2, sin_TD2 = self.rotary_emb(position_ids, h_BTD.dtype)  # [B, 1, T, D2] for [B, T] positions
        for layer in layers:
            h_BTD = layer(h_BTD, cos_TD2, sin_TD2)
        return h_BTD


class LMHead(nn.Linear):
    """lm_head: ``lm_head(h_BTD)`` -> logits [B, T, V]; ``lm_head(h_BTD, labels_BT)`` -> the mean
    cross-entropy (fp32 scalar), chunked over ``loss_chunk_tokens`` tokens (0: full logits).

    The loss runs inside this module's call on purpose: FSDP2 (lm_head is in the root unit) and
    DeepSpeed ZeRO-3 (which empties parameters outside their module's forward and gathers them
    again for the backward through hooks on the module's outputs) see its weight used here."""

    def __init__(self, hidden_size: int, vocab_size: int, loss_chunk_tokens: int):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, h_BTD: torch.Tensor, labels_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels_BT is None:
            return super().forward(h_BTD)
        return linear_cross_entropy(h_BTD.flatten(0, -2), self.weight, labels_BT.flatten(), self.loss_chunk_tokens)


class KimiForCausalLM(nn.Module):
    """A Kimi-K2 / DeepSeek-V3 style causal LM: logits [B, T, V], or the loss given labels (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.model = KimiModel(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.loss_chunk_tokens)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share lm_head.weight with the embedding when tie_word_embeddings (`to_empty` unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; also valid after `to_empty()` from meta."""
        cfg = self.config
        self.tie_weights()
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
        nn.init.normal_(self.model.embed_tokens.weight, std=std)
        for layer in self.model.layers.values():
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
            layer.self_attn.init_weights(std, out_std)
            layer.mlp.init_weights(std, out_std)
        self.model.norm.reset_parameters()
        self.model.rotary_emb.reset_parameters()
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; with labels [B, T] (shifted, -100 ignored) -> mean loss."""
        return self.lm_head(self.model(input_ids, position_ids), labels)

    def attention_layers(self) -> list[nn.Module]:
        """The attention modules, each an optim.QKClipAttention (pass them to optim.MuonClip)."""
        return [layer.self_attn for layer in self.model.layers.values()]

    def moe_layers(self) -> list[MoE]:
        """The MoE modules (pass them to kimi_train.model.moe.update_expert_bias)."""
        return [layer.mlp for layer in self.model.layers.values() if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def measure_max_logits(self, input_ids_BT: torch.Tensor) -> None:
        """A forward whose only effect is the attention layers' max-logit records (for the
        trainer's post-step diagnostic): no grad, and the MoE layers in eval mode, so their
        routed-token counts (which the expert-bias update reads) are untouched."""
        with self.measuring_max_logits():
            self.model(input_ids_BT)  # the decoder stack only: the logits are not needed

    @contextlib.contextmanager
    def measuring_max_logits(self):
        """The modes of ``measure_max_logits``' forward (a pipeline runs its stages in them): eval,
        except attention, which records max logits only in train mode; restored after."""
        was_training = self.training
        self.eval()
        for attn in self.attention_layers():
            attn.train()
        try:
            yield
        finally:
            self.train(was_training)

    def set_record_max_logits(self, enabled: bool) -> None:
        for attn in self.attention_layers():
            attn.record_max_logits = enabled
