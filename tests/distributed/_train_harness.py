"""A minimal MuonClip training loop for parity tests: one process or FSDP/EP over gloo ranks.

The global batch is split evenly over the data-parallel ranks; each rank's loss is the mean
over its own tokens, FSDP averages the gradients, so the distributed run computes the same
update as one process on the whole batch (up to reduction order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kimi_train.loop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.parallel import ParallelDims, clip_grad_norm_, parallelize_model
from kimi_train.parallel.engine import balance_experts
from kimi_train.parallel.fsdp_engine import FSDP2State
from optim import MuonClip, muon_param_groups

STEPS = 10
BATCH, SEQ = 8, 32
TAU = 0.1  # the tiny model starts near 0.08 and crosses it within a few steps: QK-Clip fires


def model_config():
    return load_model_config(
        "tiny", hidden_size=64, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, intermediate_size=128, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_logits_chunk=SEQ,
    )


def batches(vocab: int):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(parallel: dict | None = None, steps: int = STEPS, load_dir: str | None = None,
          save_dir: str | None = None, save_step: int | None = None) -> dict:
    """Train steps [start, steps) where start is 0 or the step of the checkpoint in load_dir.

    Returns the global-mean loss and the clipped-head count of each step run, the full
    gradients of the first step run, the final full parameters and router biases.
    """
    cfg = model_config()
    torch.manual_seed(0)
    model = KimiForCausalLM(cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims.from_config(parallel or {}, world, cfg)
    mesh = dims.build_mesh("cpu")
    model = parallelize_model(model, dims, mesh)
    opt = MuonClip(muon_param_groups(model), attention_layers=model.attention_layers(), tau=TAU,
                   lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, ns_backend="torch")
    # state for every parameter on every rank from construction (same checkpoint layout everywhere)
    assert all(opt.state[p] for group in opt.param_groups for p in group["params"])
    start = 0
    if load_dir is not None:
        start = load_checkpoint(latest_checkpoint(load_dir), FSDP2State(model, opt))["step"]
    per_rank = BATCH // dims.dp_size
    losses, clipped, grads0, grad_norm0 = [], [], None, None
    for step in range(start, steps):
        batch = batches(cfg.vocab_size)[step]
        local = batch[dims.dp_rank * per_rank : (dims.dp_rank + 1) * per_rank]
        logits = model(local[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), local[:, 1:].reshape(-1))
        loss.backward()
        if grads0 is None:
            grads0 = {n: _full(p.grad) for n, p in model.named_parameters()}
            # the global norm across the dense and expert meshes (max_norm large: measure only)
            grad_norm0 = float(clip_grad_norm_(model.parameters(), 1e9))
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance_experts(model.moe_layers(), 1e-3, dims.dp_group)
        global_loss = loss.detach().clone()
        if dims.dp_group is not None:
            dist.all_reduce(global_loss, group=dims.dp_group)
            global_loss /= dims.dp_size
        losses.append(float(global_loss))
        clipped.append(opt.last_stats["clipped_heads"])
        if save_dir is not None and step + 1 == save_step:
            save_checkpoint(save_dir, step + 1, FSDP2State(model, opt), {}, keep=1)
    params = {n: _full(p) for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if "e_score_correction_bias" in n}
    return {"losses": losses, "clipped": clipped, "grads0": grads0, "grad_norm0": grad_norm0, "params": params, "buffers": buffers}
