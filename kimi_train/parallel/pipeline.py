"""Pipeline parallelism: the model cut by depth into stages, run by torch.distributed.pipelining.

    layout = stage_layers(num_layers, num_stages, cfg.parallel.pp_layout)   # layer indices per stage
    stages = split_model(model, layout, my_stage_indices)    # this rank's StageModules; model pruned in place

Stages (``S = pp * stages per rank``; 1F1B: one per rank, Interleaved1F1B: ``v`` per rank, stage ``s``
on pp rank ``s % pp``, the layout torch's interleaved schedules expect):

    stage 0        embed_tokens, layers[0 .. a)
    stage s        layers[a .. b)                 hidden states [B, T, D] in, hidden states out
    stage S - 1    layers[.. L), norm, lm_head    returns the micro-batch's mean loss (labels as a kwarg)

``split_model`` keeps one ``KimiForCausalLM`` per rank with only that rank's modules (the others are
deleted, ``embed_tokens`` / ``norm`` / ``lm_head`` set to None where another rank has them): its
state-dict names are those of the whole model (the layers are a ``DecoderLayers`` keyed by model
index), so checkpoints move between pipeline layouts and to PP=1, and the optimizer, QK-Clip's
attention layers and the expert-bias update read it as they read an unsplit model. A
``StageModule`` registers only its own modules (a module belongs to one stage), because torch's
schedule scales and FSDP reduces the gradients of ``stage.parameters()``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from kimi_train.model import KimiForCausalLM, MoE

def stage_layers(num_layers: int, num_stages: int, layout: Optional[Sequence[int]] = None) -> list[list[int]]:
    """The decoder-layer indices of each stage: ``layout`` (layers per stage) or an even split,
    the first stages taking one more when it does not divide (the last stage also runs lm_head
    and the loss). Raises ValueError naming the layout when it does not fit."""
    if layout:
        counts = list(layout)
        if len(counts) != num_stages or sum(counts) != num_layers or any(c < 0 for c in counts):
            raise ValueError(f"parallel.pp_layout={counts} must give {num_stages} stages that sum to "
                             f"model.num_hidden_layers={num_layers}")
    else:
        if num_layers < num_stages:
            raise ValueError(f"model.num_hidden_layers={num_layers} is fewer than the {num_stages} pipeline stages")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (s < extra) for s in range(num_stages)]
    bounds = [sum(counts[:s]) for s in range(num_stages + 1)]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(num_stages)]


class StageModule(nn.Module):
    """One pipeline stage of a KimiForCausalLM: its decoder layers (same objects, same names), plus
    the embedding on the first stage and the final norm and lm_head on the last.

    ``forward(x, labels=None)``: x is token ids [B, T] on the first stage, hidden states [B, T, D]
    on the others; returns hidden states, or on the last stage the mean loss over ``labels`` (the
    loss runs inside lm_head's call, as in the whole model; without labels, the logits)."""

    def __init__(self, model: KimiForCausalLM, layers: Sequence[int], first: bool, last: bool):
        super().__init__()
        self.layers = type(model.model.layers)({str(i): model.model.layers[i] for i in layers})
        self.embed_tokens = model.model.embed_tokens if first else None
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.is_first, self.is_last = first, last
        # The decoder's loop over layers (rotary embedding included), not registered: its modules
        # belong to the rank's model, and this stage's parameters are only its own.
        self._decode = model.model.decode

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h_BTD = self.embed_tokens(x) if self.is_first else x
        h_BTD = self._decode(h_BTD, self.layers.values())
        if not self.is_last:
            return h_BTD
        return self.lm_head(self.norm(h_BTD), labels)


def split_model(model: KimiForCausalLM, layout: list[list[int]], mine: Sequence[int]) -> list[StageModule]:
    """This rank's stages (``mine``: stage indices) of ``model``, which keeps only their modules."""
    last = len(layout) - 1
    stages = [StageModule(model, layout[s], s == 0, s == last) for s in mine]
    keep = {str(i) for s in mine for i in layout[s]}
    for key in [k for k in model.model.layers.keys() if k not in keep]:
        del model.model.layers[key]
    if 0 not in mine:
        model.model.embed_tokens = None
    if last not in mine:
        model.model.norm = None
        model.lm_head = None
    return stages


def layer_index(model: KimiForCausalLM) -> dict[str, list[int]]:
    """The model indices of a (split) model's attention layers and MoE layers, in the order of
    ``model.attention_layers()`` and ``model.moe_layers()``."""
    keys = [int(k) for k in model.model.layers.keys()]
    return {"attention": keys, "moe": [i for i in keys if isinstance(model.model.layers[i].mlp, MoE)]}
