"""optim: Muon and MuonClip as a standalone PyTorch optimizer library.

    from optim import MuonClip, muon_param_groups
    opt = MuonClip(muon_param_groups(model), attention_layers=model.attention_layers(), lr=2e-4)

Depends on torch only (Triton optionally); never imports kimi_train.
"""

from .muon import Muon, muon_scale
from .muon_clip import MuonClip, reduce_max_logits
from .newton_schulz import newton_schulz
from .param_groups import muon_param_groups
from .protocol import QKClipAttention, QKClipTarget
from .qk_clip import NonFiniteMaxLogit, clip_gqa_, clip_mha_, clip_mla_, clip_target_

__all__ = [
    "Muon",
    "MuonClip",
    "NonFiniteMaxLogit",
    "reduce_max_logits",
    "muon_param_groups",
    "muon_scale",
    "newton_schulz",
    "QKClipAttention",
    "QKClipTarget",
    "clip_mha_",
    "clip_gqa_",
    "clip_mla_",
    "clip_target_",
]
