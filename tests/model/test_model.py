"""KimiForCausalLM: structure, initialisation at depth, dtypes, meta-device construction."""

import pytest
import torch

from kimi_train.model import KimiForCausalLM, MoE, load_model_config


def test_module_tree_mirrors_transformers():
    model = KimiForCausalLM(load_model_config("tiny", q_lora_rank=16))
    keys = set(model.state_dict())
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.experts.gate_proj",
              "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.1.mlp.tokens_per_expert",
              "model.layers.2.self_attn.q_a_layernorm.weight", "model.layers.2.self_attn.kv_b_proj.weight",
              "model.layers.3.post_attention_layernorm.weight"]:  # fmt: skip
        assert k in keys, k
    assert model.model.layers[1].mlp.experts.gate_proj.shape == (8, 96, 128)  # [E, out, in]
    assert model.model.layers[1].mlp.experts.down_proj.shape == (8, 128, 96)
    assert len(model.moe_layers()) == 3 and all(isinstance(m, MoE) for m in model.moe_layers())
    assert [a.qk_clip_target().kind for a in model.attention_layers()] == ["mla"] * 4
    assert model.attention_layers()[2].qk_clip_target().w_q is model.model.layers[2].self_attn.q_b_proj.weight
    # Router biases are buffers, not parameters (optimizers must not see them).
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())


def test_init_is_deterministic_and_rematerialises_from_meta():
    cfg = load_model_config("tiny", tie_word_embeddings=True)
    torch.manual_seed(5)
    a = KimiForCausalLM(cfg)
    with torch.device("meta"):
        b = KimiForCausalLM(cfg)
    b.to_empty(device="cpu")
    torch.manual_seed(5)
    a.init_weights()
    torch.manual_seed(5)
    b.init_weights()
    assert b.lm_head.weight is b.model.embed_tokens.weight  # re-tied after to_empty
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 256, (2, 8))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("attention_type", ["mla", "gqa"])
def test_activations_and_logits_stay_order_one_at_depth(attention_type):
    torch.manual_seed(0)
    cfg = load_model_config("tiny", hidden_size=64, num_hidden_layers=16, intermediate_size=128,
                            moe_intermediate_size=32, attention_type=attention_type)  # fmt: skip
    model = KimiForCausalLM(cfg)
    rms = []
    hooks = [layer.register_forward_hook(lambda m, i, o: rms.append(o.pow(2).mean().sqrt().item()))
             for layer in model.model.layers]  # fmt: skip
    ids = torch.randint(0, 256, (2, 32))
    logits = model(ids)
    for h in hooks:
        h.remove()
    # The residual stream grows slowly (scaled output projections), not exponentially.
    assert rms[-1] / rms[0] < 3.0, rms
    assert 0.01 < logits.std().item() < 3.0
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1  # ~uniform at init
    loss.backward()
    norms = [p.grad.norm().item() for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(torch.tensor(norms))) and max(norms) < 10


def test_bf16_forward_backward():
    torch.manual_seed(0)
    model = KimiForCausalLM(load_model_config("tiny")).to(torch.bfloat16).train()
    ids = torch.randint(0, 256, (2, 32))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert model.model.layers[1].mlp.experts.gate_proj.grad.dtype == torch.bfloat16
    assert model.attention_layers()[0].max_logits.dtype == torch.float32
    assert model.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32


def test_tiny_learns_with_muon():
    optim = pytest.importorskip("optim")
    torch.manual_seed(0)
    model = KimiForCausalLM(load_model_config("tiny", num_hidden_layers=2)).train()
    opt = optim.MuonClip(optim.muon_param_groups(model), attention_layers=model.attention_layers(), lr=3e-3)
    ids = torch.randint(0, 256, (2, 17))
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.gpu
def test_cuda_bf16_training_forward_matches_cpu_max_logits():
    torch.manual_seed(0)
    model = KimiForCausalLM(load_model_config("tiny", q_lora_rank=32)).train()
    ids = torch.randint(0, 256, (2, 128))
    model(ids)
    cpu_max = [a.max_logits.clone() for a in model.attention_layers()]
    for a in model.attention_layers():
        a.reset_max_logits()
    model.cuda()
    logits = model(ids.cuda())  # auto backends: Triton max-logit kernel, grouped GEMM, flash SDPA
    logits.float().logsumexp(-1).mean().backward()
    for got, ref in zip([a.max_logits for a in model.attention_layers()], cpu_max):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    model.to(torch.bfloat16)
    assert model.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert torch.isfinite(model(ids.cuda()).float()).all()


def test_autocast_keeps_router_and_max_logits_fp32():
    torch.manual_seed(0)
    model = KimiForCausalLM(load_model_config("tiny", num_hidden_layers=2)).train()
    ids = torch.randint(0, 256, (2, 32))
    model(ids)
    ref = model.attention_layers()[1].max_logits.clone()
    model.attention_layers()[1].reset_max_logits()
    moe = model.moe_layers()[0]
    seen = {}
    moe.gate.register_forward_hook(lambda m, i, o: seen.update(router=o[0].dtype))
    moe.experts.register_forward_hook(lambda m, i, o: seen.update(experts=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16 and seen == {"router": torch.float32, "experts": torch.bfloat16}
    got = model.attention_layers()[1].max_logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.01)  # bf16 activations, fp32 logit maths
    logits.float().mean().backward()
    assert moe.experts.gate_proj.grad.dtype == torch.float32
