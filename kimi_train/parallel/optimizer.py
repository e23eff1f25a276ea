"""The optimizer of a TrainConfig, built in this one place for every engine.

    optimizer = build_optimizer(cfg, model, dp_group)                    # FSDP2 / one process
    client = build_optimizer(cfg, model, partitioned=True)               # DeepSpeed's client optimizer

optim=muonclip -> optim.MuonClip (QK-Clip over ``model.attention_layers()``); muon, or muonclip with
qk_clip.enabled=false -> optim.Muon; adamw -> AdamW over every parameter (the usual baseline).
``partitioned=True``: the same maths as ``optim.flat.PartitionedMuonClip``, for an engine that
partitions the optimizer state itself (DeepSpeed ZeRO); adamw is then one AdamW group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from optim import Muon, MuonClip, muon_param_groups


def build_optimizer(cfg: Any, model: nn.Module, process_group: Any = None, check_finite: bool = True,
                    partitioned: bool = False) -> torch.optim.Optimizer:
    """``process_group``: where QK-Clip MAX-reduces the max logits (None: the default group).
    ``check_finite=False`` drops Muon's own non-finite-gradient check, for an engine that skips
    such steps before ``step()``."""
    o = cfg.optim
    clip = o.name == "muonclip" and o.qk_clip.enabled
    muon_kwargs = dict(lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                       ns_steps=o.ns_steps, ns_method=o.ns_method, ns_dtype=o.ns_dtype, ns_backend=o.ns_backend,
                       adjust_lr=o.adjust_lr, adamw_betas=tuple(o.betas), adamw_eps=o.eps)
    if partitioned:
        from optim.flat import PartitionedMuonClip

        if o.name == "adamw":
            names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
            groups = [{"params": list(params), "param_names": list(names), "use_muon": False}]
        else:
            groups = muon_param_groups(model, lr=o.lr, weight_decay=o.weight_decay)
        return PartitionedMuonClip(groups, attention_layers=model.attention_layers() if clip else None,
                                   tau=o.qk_clip.tau if clip else None, process_group=process_group, **muon_kwargs)
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
    groups = muon_param_groups(model, lr=o.lr, weight_decay=o.weight_decay)
    if clip:
        return MuonClip(groups, attention_layers=model.attention_layers(), tau=o.qk_clip.tau,
                        process_group=process_group, check_finite=check_finite, **muon_kwargs)
    return Muon(groups, check_finite=check_finite, **muon_kwargs)
