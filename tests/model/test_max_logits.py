"""Per-head max-logit capture: exact vs brute force, and what MuonClip does with it."""

import math

import pytest
import torch

from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.model.max_logits import per_head_max_logits, per_head_max_logits_reference


@pytest.mark.parametrize("H,Hkv,T,chunk", [(4, 4, 17, 1), (4, 4, 17, 5), (6, 2, 33, 8), (4, 1, 9, 64)])
def test_chunked_equals_brute_force(H, Hkv, T, chunk):
    g = torch.Generator().manual_seed(H * T + chunk)
    q = torch.randn(3, H, T, 24, generator=g)
    k = torch.randn(3, Hkv, T, 24, generator=g)
    got = per_head_max_logits(q, k, 0.3, chunk_size=chunk, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (H,)
    torch.testing.assert_close(got, per_head_max_logits_reference(q, k, 0.3), rtol=1e-6, atol=1e-5)


def test_signed_and_causal():
    # Head 0: every visible logit negative -> a negative max. Head 1: the only large logit is
    # in the future (j > i) and must be ignored.
    T = 4
    q = torch.zeros(1, 2, T, 2)
    k = torch.zeros(1, 2, T, 2)
    q[0, 0, :, 0], k[0, 0, :, 0] = 1.0, -1.0  # every q.k = -1
    q[0, 1, 0, 1], k[0, 1, 3, 1] = 50.0, 50.0  # q_0 . k_3 = 2500, not visible to query 0
    q[0, 1, 3, 0], k[0, 1, 1, 0] = 2.0, 3.0  # q_3 . k_1 = 6, visible
    got = per_head_max_logits(q, k, 0.5, chunk_size=2, backend="torch")
    assert got.tolist() == [-0.5, 3.0]


def _rotate(x, cfg, dim):
    """Independent RoPE: complex multiplication on (x[i], x[i + D/2]) pairs (half layout)."""
    from kimi_train.model.rope import rope_frequencies

    inv_freq, mult = rope_frequencies(dim, cfg.rope_theta, cfg.rope_scaling)
    T = x.shape[-2]
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq.double()[None]
    z = torch.complex(x[..., : dim // 2].double(), x[..., dim // 2 :].double()) * torch.polar(mult * torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def _brute_force_layer0(model, ids):
    """S_max of layer 0 straight from the weights, in float64, with a full T x T score matrix."""
    cfg = model.config
    attn = model.model.layers[0].self_attn
    W = lambda m: m.weight.double()  # noqa: E731
    rms = lambda x, w, eps: w.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    x = rms(model.model.embed_tokens.weight.double()[ids], model.model.layers[0].input_layernorm.weight, cfg.rms_norm_eps)
    B, T = ids.shape
    H = cfg.num_attention_heads
    if cfg.attention_type == "gqa":
        Dh, Hkv = cfg.gqa_head_dim, cfg.num_key_value_heads
        q = _rotate((x @ W(attn.q_proj).T).view(B, T, H, Dh).transpose(1, 2), cfg, Dh)
        k = _rotate((x @ W(attn.k_proj).T).view(B, T, Hkv, Dh).transpose(1, 2), cfg, Dh)
        k = k.repeat_interleave(H // Hkv, dim=1)
        scale = Dh**-0.5
    else:
        Dn, Dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            q = x @ W(attn.q_proj).T
        else:
            q = rms(x @ W(attn.q_a_proj).T, attn.q_a_layernorm.weight, 1e-6) @ W(attn.q_b_proj).T
        q = q.view(B, T, H, Dn + Dr).transpose(1, 2)
        ckv = x @ W(attn.kv_a_proj_with_mqa).T
        c, k_rope = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank :]
        kv = (rms(c, attn.kv_a_layernorm.weight, 1e-6) @ W(attn.kv_b_proj).T).view(B, T, H, -1).transpose(1, 2)
        k_rope = _rotate(k_rope[:, None], cfg, Dr).expand(B, H, T, Dr)
        q = torch.cat([q[..., :Dn], _rotate(q[..., Dn:], cfg, Dr)], dim=-1)
        k = torch.cat([kv[..., :Dn], k_rope], dim=-1)
        scale = attn.softmax_scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    return s.amax(dim=(0, 2, 3))


YARN = dict(type="yarn", factor=8.0, original_max_position_embeddings=8, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)  # fmt: skip
VARIANTS = {
    "mla": dict(q_lora_rank=None),
    "mla_qlora_yarn": dict(q_lora_rank=24, rope_scaling=YARN),
    "gqa": dict(attention_type="gqa", num_key_value_heads=2),
}


def _model(variant, **extra):
    torch.manual_seed(0)
    cfg = load_model_config("tiny", hidden_size=64, num_hidden_layers=2, n_routed_experts=4, moe_intermediate_size=32,
                            intermediate_size=96, init_std=0.2, max_logits_chunk=5, **{**VARIANTS[variant], **extra})
    return KimiForCausalLM(cfg)  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recorded_max_logits_equal_brute_force_from_weights(variant):
    model = _model(variant).train()
    ids = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(2))
    model(ids)
    recorded = model.attention_layers()[0].max_logits
    torch.testing.assert_close(recorded.double(), _brute_force_layer0(model, ids), rtol=1e-5, atol=1e-5)
    # Running max over forwards; reset clears; eval and the switch turn recording off.
    first = recorded.clone()
    model(ids[:1])
    assert torch.equal(model.attention_layers()[0].max_logits, first)
    for attn in model.attention_layers():
        attn.reset_max_logits()
    model.eval()(ids)
    assert all(a.max_logits is None for a in model.attention_layers())
    model.train().set_record_max_logits(False)
    model(ids)
    assert all(a.max_logits is None for a in model.attention_layers())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_muonclip_brings_clipped_heads_to_tau(variant):
    optim = pytest.importorskip("optim")
    model = _model(variant).train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    before = model.attention_layers()[0].max_logits.clone()
    tau = float(before.median())  # about half of the heads are over tau
    opt = optim.MuonClip(optim.muon_param_groups(model), attention_layers=model.attention_layers(), tau=tau,
                         lr=0.0, weight_decay=0.0)  # fmt: skip
    opt.step()  # lr 0: the clip is the only change to the weights
    assert opt.last_stats["clipped_heads_per_layer"][0] == int((before > tau).sum()) > 0
    assert all(a.max_logits is None for a in model.attention_layers())  # MuonClip reset them

    model(ids)
    after = model.attention_layers()[0].max_logits
    if variant == "gqa":  # one gamma per KV group: the group's largest head lands on tau
        groups_before, groups_after = before.view(2, -1).amax(1), after.view(2, -1).amax(1)
        clipped = groups_before > tau
        torch.testing.assert_close(groups_after[clipped], torch.full_like(groups_after[clipped], tau), rtol=1e-5, atol=0)
        assert torch.equal(after.view(2, -1)[~clipped], before.view(2, -1)[~clipped])
    else:
        clipped = before > tau
        torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-5, atol=0)
        assert torch.equal(after[~clipped], before[~clipped])


@pytest.mark.parametrize("variant", ["mla", "gqa"])
def test_measure_max_logits_records_and_nothing_else(variant):
    """The records of a training forward, from a no-grad forward that leaves the MoE counts and
    every module's train/eval mode as they were (even in eval mode, where forwards record nothing)."""
    model = _model(variant).train()
    layers = model.attention_layers()
    ids = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(4))
    model(ids)
    want = torch.stack([a.max_logits for a in layers])
    for a in layers:
        a.reset_max_logits()
    for m in model.moe_layers():
        m.reset_counts()
    assert model.measure_max_logits(ids) is None
    assert torch.equal(torch.stack([a.max_logits for a in layers]), want)
    assert all(m.training for m in model.modules())
    assert all(m.routed_counts().sum() == 0 for m in model.moe_layers())
    for a in layers:
        a.reset_max_logits()
    model.eval().measure_max_logits(ids)
    assert torch.equal(torch.stack([a.max_logits for a in layers]), want)
    assert not any(m.training for m in model.modules())
    for a in layers:
        a.reset_max_logits()
    model.set_record_max_logits(False)
    model.measure_max_logits(ids)
    assert all(a.max_logits is None for a in layers)
