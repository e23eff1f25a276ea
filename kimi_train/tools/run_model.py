"""The model of a training run, from its config.yaml and a checkpoint of either engine.

    model = load_model_from_run("runs/tiny-muonclip")             # the newest verified checkpoint
    model = load_model_from_run("runs/tiny-muonclip", step=200)   # that one (damaged: CheckpointError)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from kimi_train.loop.checkpoint import CheckpointError
from kimi_train.loop.checkpoint.load import dcp_load, load_newest_usable, saved_engine, step_checkpoint, verified
from kimi_train.model import KimiForCausalLM, model_config_from_dict


def load_weights(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """The weights of any engine's checkpoint ``path`` into a plain (unsharded) model."""
    if saved_engine(path) == "deepspeed":
        from kimi_train.parallel.deepspeed_checkpoint import flat_weights_state, unflatten_weights

        state = flat_weights_state(model)
        dcp_load(state, path)
        unflatten_weights(model, state)
        return model
    state = {"model": get_model_state_dict(model)}
    dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    return model


def load_model_from_run(run_dir: str | Path, step: Optional[int] = None, device: str | torch.device = "cpu",
                        checksums: bool = True) -> KimiForCausalLM:
    """The model of a training run: its saved config and the newest verified (or the given) checkpoint.

    Without ``step``, a damaged newest checkpoint gets a warning and the one before it is used;
    a damaged ``step`` raises ``CheckpointError``.

    >>> model = load_model_from_run("runs/tiny-muonclip")
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"run_dir={str(run_dir)!r} has no config.yaml; pass the directory of a kimi-train run")
    model_cfg = model_config_from_dict(OmegaConf.to_container(OmegaConf.load(cfg_file).model, resolve=True))
    with torch.device(device):
        model = KimiForCausalLM(model_cfg)
    if step is not None:
        return load_weights(verified(step_checkpoint(run_dir, step), checksums), model)
    if load_newest_usable(run_dir, lambda p: load_weights(p, model), checksums) is None:
        raise CheckpointError(f"run_dir={str(run_dir)!r} has no complete checkpoint under checkpoints/")
    return model
