"""Split a model's parameters into Muon and AdamW groups.

Muon is for the matrices of hidden layers. Everything whose rows are not a
linear map of the hidden state goes to AdamW: embeddings (rows are a lookup
table), the output head (its rows are per-token logits; Moonlight and K2 keep
it on AdamW), norm gains, biases, and anything with fewer than two dims.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = ["muon_param_groups", "DEFAULT_ADAMW_PATTERNS", "DEFAULT_ADAMW_OWNERS"]

# AdamW by default: a module path component containing "embed" or "norm" anywhere, or an
# output head / position table as the module that owns the parameter (torchtitan's `output`,
# GPT-2's `wte`/`wpe`; not BERT's `attention.output.dense`, a hidden matrix).
DEFAULT_ADAMW_PATTERNS = (r"embed", r"norm")
DEFAULT_ADAMW_OWNERS = ("lm_head", "output", "wte", "wpe")


def muon_param_groups(
    model: nn.Module,
    lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
    muon_patterns: Sequence[str] = (),
    adamw_patterns: Sequence[str] = (),
    adamw_lr: Optional[float] = None,
    adamw_weight_decay: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Param groups for ``optim.Muon`` / ``optim.MuonClip``: ``[muon_group, adamw_group]``.

    Default rule: a trainable parameter goes to AdamW when it has fewer than 2 dims, belongs
    to an ``nn.Embedding``, a component of its module path contains "embed" or "norm", or
    its owning module is named lm_head, output, wte or wpe; every other matrix (2-D, or 3-D expert
    weights [E, out, in]) goes to Muon. ``muon_patterns`` / ``adamw_patterns`` are regexes
    searched in the full name that override the rule (a name matching both is an error).
    Each group carries ``param_names`` (used in error messages) and ``use_muon``. ``lr`` /
    ``weight_decay`` set both groups (None: the optimizer's defaults); ``adamw_lr`` /
    ``adamw_weight_decay`` override them for the AdamW group only. Empty groups are dropped.
    """
    muon_res = [re.compile(p) for p in muon_patterns]
    adamw_res = [re.compile(p) for p in adamw_patterns]
    default_res = [re.compile(p) for p in DEFAULT_ADAMW_PATTERNS]
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}

    muon: tuple[list[str], list[torch.Tensor]] = ([], [])
    adamw: tuple[list[str], list[torch.Tensor]] = ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        force_muon = any(r.search(name) for r in muon_res)
        force_adamw = any(r.search(name) for r in adamw_res)
        if force_muon and force_adamw:
            raise ValueError(f"muon_param_groups: parameter {name!r} matches both muon_patterns and adamw_patterns")
        if force_muon and p.ndim < 2:
            raise ValueError(f"muon_param_groups: parameter {name!r} has shape {tuple(p.shape)}; Muon needs >= 2 dims")
        if force_muon:
            to_muon = True
        elif force_adamw:
            to_muon = False
        else:
            components = name.split(".")[:-1]  # module path; the last component is weight/bias
            to_muon = not (
                p.ndim < 2
                or id(p) in embedding_params
                or any(r.search(c) for r in default_res for c in components)
                or (components and components[-1] in DEFAULT_ADAMW_OWNERS)
            )
        names, params = muon if to_muon else adamw
        names.append(name)
        params.append(p)

    groups = []
    for (names, params), use_muon in ((muon, True), (adamw, False)):
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "param_names": names, "use_muon": use_muon}
        group_lr = lr if use_muon or adamw_lr is None else adamw_lr
        group_wd = weight_decay if use_muon or adamw_weight_decay is None else adamw_weight_decay
        if group_lr is not None:
            group["lr"] = group_lr
        if group_wd is not None:
            group["weight_decay"] = group_wd
        groups.append(group)
    return groups
