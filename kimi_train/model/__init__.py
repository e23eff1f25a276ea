"""The Kimi-K2 model family (MLA attention, fine-grained MoE), as plain nn.Modules.

    from kimi_train.model import ModelConfig, KimiForCausalLM, load_model_config
    cfg = load_model_config("tiny")                 # configs/model/tiny.yaml
    model = KimiForCausalLM(cfg)
    logits_BTV = model(input_ids_BT)
    loss = model(input_ids_BT, labels=labels_BT)    # labels already shifted, -100 ignored (model/loss.py)
    model.attention_layers()                        # -> optim.MuonClip(attention_layers=...)
    model.moe_layers()                              # -> update_expert_bias(...) after each step
                                                    #    (counts summed over data-parallel ranks by the caller)
"""

from .config import ModelConfig, load_model_config, model_config_from_dict
from .max_logits import per_head_max_logits
from .moe import MoE, GroupedExperts, Router, expert_counts, update_expert_bias
from .transformer import KimiForCausalLM

__all__ = [
    "ModelConfig",
    "load_model_config",
    "model_config_from_dict",
    "KimiForCausalLM",
    "MoE",
    "GroupedExperts",
    "Router",
    "expert_counts",
    "update_expert_bias",
    "per_head_max_logits",
]
