"""FSDP2 with bf16 mixed precision: the router still scores with an fp32 weight (SPEC section 3),
the other matrices compute in bf16, and the sharded master weights stay fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _spawn import spawn
from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.parallel import ParallelDims, parallelize_model


def _worker(rank: int, world: int) -> None:
    cfg = load_model_config("tiny", hidden_size=64, num_hidden_layers=2, moe_intermediate_size=32, intermediate_size=128,
                            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    model = KimiForCausalLM(cfg)
    dims = ParallelDims.from_config({}, world, cfg)
    model = parallelize_model(model, dims, dims.build_mesh("cpu"), mixed_precision=True)
    seen: dict[str, torch.dtype] = {}

    def record(name, weight_of):
        def hook(module, args):  # returns None: the inputs pass unchanged
            seen.setdefault(name, weight_of(module).dtype)
        return hook

    moe = model.moe_layers()[0]
    moe.gate.register_forward_pre_hook(record("router", lambda m: m.weight))
    attn = model.attention_layers()[0]
    attn.register_forward_pre_hook(record("attn", lambda m: m.kv_b_proj.weight))
    x = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
    logits = model(x[:, :-1])
    F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1)).backward()
    assert seen == {"router": torch.float32, "attn": torch.bfloat16}, seen
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.weight.grad.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_router_keeps_fp32_weight_under_bf16_mixed_precision():
    spawn(_worker, 2)
