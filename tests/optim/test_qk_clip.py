"""QK-Clip exactness (fp64): recompute the logits from weights and inputs after the clip.

Shape legend: B batch, T tokens, D model width, H query heads, G kv heads, d head dim,
r LoRA rank.
"""

import math

import pytest
import torch

from optim import QKClipTarget, clip_gqa_, clip_mha_, clip_mla_, clip_target_

B, T, D = 2, 12, 32
f64 = torch.float64


def _causal_max_BHTT(s_BHTT):
    mask_TT = torch.ones(T, T, dtype=torch.bool).tril()
    return s_BHTT.masked_fill(~mask_TT, -math.inf).amax(dim=(0, 2, 3))


def _gqa_logits_H(x_BTD, w_q, w_k, H, G):
    d = w_q.shape[0] // H
    q_BHTd = (x_BTD @ w_q.T).view(B, T, H, d).transpose(1, 2)
    k_BGTd = (x_BTD @ w_k.T).view(B, T, G, d).transpose(1, 2)
    k_BHTd = k_BGTd.repeat_interleave(H // G, dim=1)
    return _causal_max_BHTT(q_BHTd @ k_BHTd.mT * d**-0.5)


def _rope(x_BHTd):
    """Rotate-half RoPE over positions 0..T-1 (any RoPE: the clip must commute with it)."""
    d = x_BHTd.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=f64) / d))
    ang_Td = torch.cat([torch.outer(torch.arange(T, dtype=f64), inv_freq)] * 2, dim=-1)
    x1, x2 = x_BHTd[..., : d // 2], x_BHTd[..., d // 2 :]
    return x_BHTd * ang_Td.cos() + torch.cat([-x2, x1], dim=-1) * ang_Td.sin()


def _rms(x):
    return x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()


class MLA:
    """Random MLA weights (K2 layout) and a reference logit computation."""

    def __init__(self, H=4, dn=8, dr=4, dv=6, r_q=16, r_kv=12, q_lora=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.H, self.dn, self.dr, self.dv, self.r_kv = H, dn, dr, dv, r_kv
        self.q_a = torch.randn(r_q, D, generator=g, dtype=f64) if q_lora else None
        self.q_b = torch.randn(H * (dn + dr), r_q if q_lora else D, generator=g, dtype=f64)
        self.kv_a = torch.randn(r_kv + dr, D, generator=g, dtype=f64)
        self.kv_b = torch.randn(H * (dn + dv), r_kv, generator=g, dtype=f64)
        # heads of very different size so some are over tau and some are not
        head_gain_H = torch.tensor([3.0, 0.3, 2.0, 0.5])[:H].to(f64)
        self.q_b.view(H, dn + dr, -1).mul_(head_gain_H[:, None, None])

    def logits_H(self, x_BTD):
        H, dn, dr = self.H, self.dn, self.dr
        q_in = _rms(x_BTD @ self.q_a.T) if self.q_a is not None else x_BTD
        q_BHTe = (q_in @ self.q_b.T).view(B, T, H, dn + dr).transpose(1, 2)
        kv_a = x_BTD @ self.kv_a.T
        c_kv, k_rope_BT = kv_a[..., : self.r_kv], kv_a[..., self.r_kv :]
        kv_BHTe = (_rms(c_kv) @ self.kv_b.T).view(B, T, H, dn + self.dv).transpose(1, 2)
        q_nope, q_rope = q_BHTe[..., :dn], _rope(q_BHTe[..., dn:])
        k_nope, k_rope = kv_BHTe[..., :dn], _rope(k_rope_BT[:, None].expand(B, H, T, dr))
        s = (q_nope @ k_nope.mT + q_rope @ k_rope.mT) * (dn + dr) ** -0.5
        return _causal_max_BHTT(s)


def _tau_between(S_H):
    """A tau with some heads above it and some below."""
    s = S_H.sort().values
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


@pytest.mark.parametrize("H,G", [(4, 4), (8, 2), (6, 3)])
def test_mha_gqa_exact(H, G):
    g = torch.Generator().manual_seed(H * 10 + G)
    d = 8
    x = torch.randn(B, T, D, generator=g, dtype=f64)
    w_q = torch.randn(H * d, D, generator=g, dtype=f64)
    w_q.view(H, d, D).mul_(torch.linspace(0.2, 3.0, H, dtype=f64)[torch.randperm(H, generator=g)][:, None, None])
    w_k = torch.randn(G * d, D, generator=g, dtype=f64)
    S_H = _gqa_logits_H(x, w_q, w_k, H, G)
    tau = _tau_between(S_H)
    q0, k0 = w_q.clone(), w_k.clone()
    if H == G:
        n = clip_mha_(w_q, w_k, S_H, tau, H)
    else:
        n = clip_gqa_(w_q, w_k, S_H, tau, H, G)
    assert n == int((S_H > tau).sum()) > 0
    S_new = _gqa_logits_H(x, w_q, w_k, H, G)
    S_G = S_H.view(G, H // G).amax(1)
    for h in range(H):
        grp = h // (H // G)
        rows_q, rows_k = slice(h * d, (h + 1) * d), slice(grp * d, (grp + 1) * d)
        if S_G[grp] > tau:  # the whole group scales by gamma_g; its top head lands on tau
            torch.testing.assert_close(S_new[h], S_H[h] * tau / S_G[grp], rtol=1e-12, atol=0)
            if S_H[h] == S_G[grp]:
                torch.testing.assert_close(S_new[h], torch.tensor(tau, dtype=f64), rtol=1e-12, atol=0)
        else:  # untouched bit for bit
            assert torch.equal(w_q[rows_q], q0[rows_q]) and torch.equal(w_k[rows_k], k0[rows_k])
            assert S_new[h] == S_H[h]
    assert (S_new <= tau * (1 + 1e-12)).all()


def test_mha_alpha_splits_the_scale():
    H, d = 2, 4
    w_q, w_k = torch.ones(H * d, 3, dtype=f64), torch.ones(H * d, 3, dtype=f64)
    clip_mha_(w_q, w_k, torch.tensor([400.0, 50.0]), tau=100.0, num_heads=H, alpha=0.25)
    torch.testing.assert_close(w_q[:d], torch.full((d, 3), 0.25**0.25, dtype=f64))
    torch.testing.assert_close(w_k[:d], torch.full((d, 3), 0.25**0.75, dtype=f64))
    assert torch.equal(w_q[d:], torch.ones(d, 3, dtype=f64)) and torch.equal(w_k[d:], torch.ones(d, 3, dtype=f64))


@pytest.mark.parametrize("q_lora", [True, False])
def test_mla_exact(q_lora):
    m = MLA(q_lora=q_lora)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=f64)
    S_H = m.logits_H(x)
    tau = _tau_between(S_H)
    q_b0, kv_b0, kv_a0 = m.q_b.clone(), m.kv_b.clone(), m.kv_a.clone()
    n = clip_mla_(m.q_b, m.kv_b, S_H, tau, m.H, m.dn, m.dr, m.dv)
    assert n == int((S_H > tau).sum()) == 2
    S_new = m.logits_H(x)
    kv_b_HEr, kv_b0_HEr = m.kv_b.view(m.H, m.dn + m.dv, -1), kv_b0.view(m.H, m.dn + m.dv, -1)
    q_b_HEr, q_b0_HEr = m.q_b.view(m.H, m.dn + m.dr, -1), q_b0.view(m.H, m.dn + m.dr, -1)
    for h in range(m.H):
        assert torch.equal(kv_b_HEr[h, m.dn :], kv_b0_HEr[h, m.dn :])  # V rows untouched
        if S_H[h] > tau:
            torch.testing.assert_close(S_new[h], torch.tensor(tau, dtype=f64), rtol=1e-12, atol=0)
            gamma = tau / S_H[h]
            torch.testing.assert_close(q_b_HEr[h, m.dn :], q_b0_HEr[h, m.dn :] * gamma)  # q_rope *= gamma
            torch.testing.assert_close(q_b_HEr[h, : m.dn], q_b0_HEr[h, : m.dn] * gamma.sqrt())
        else:
            assert torch.equal(q_b_HEr[h], q_b0_HEr[h]) and torch.equal(kv_b_HEr[h], kv_b0_HEr[h])
            assert S_new[h] == S_H[h]
    assert torch.equal(m.kv_a, kv_a0)  # latent and shared k_rope: not an argument, never touched


def test_clip_target_dispatch_and_no_clip_leaves_weights():
    m = MLA()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2), dtype=f64)
    S_H = m.logits_H(x)
    target = QKClipTarget("mla", m.q_b, m.kv_b, m.H, qk_nope_head_dim=m.dn, qk_rope_head_dim=m.dr, v_head_dim=m.dv)
    q_b0 = m.q_b.clone()
    assert clip_target_(target, S_H, tau=float(S_H.max()) + 1.0) == 0
    assert torch.equal(m.q_b, q_b0)
    assert clip_target_(target, S_H, tau=float(S_H.min()) / 2) == m.H
    torch.testing.assert_close(m.logits_H(x), torch.full((m.H,), float(S_H.min()) / 2, dtype=f64), rtol=1e-12, atol=0)
    w = torch.ones(8, 3)
    gqa = QKClipTarget("gqa", w, torch.ones(4, 3), num_heads=4, num_kv_heads=2)
    assert clip_target_(gqa, torch.tensor([1.0, 9.0, 2.0, 3.0]), tau=4.0) == 1
    assert torch.equal(w[4:], torch.ones(4, 3))


def test_bf16_weights_unclipped_rows_bit_identical():
    g = torch.Generator().manual_seed(0)
    w_q = torch.randn(4 * 8, 16, generator=g).bfloat16()
    w_k = torch.randn(4 * 8, 16, generator=g).bfloat16()
    q0, k0 = w_q.clone(), w_k.clone()
    assert clip_mha_(w_q, w_k, torch.tensor([10.0, 300.0, 99.0, 100.0]), 100.0, 4) == 1  # == tau is not clipped
    for h in (0, 2, 3):
        assert torch.equal(w_q[h * 8 : (h + 1) * 8], q0[h * 8 : (h + 1) * 8])
        assert torch.equal(w_k[h * 8 : (h + 1) * 8], k0[h * 8 : (h + 1) * 8])
    torch.testing.assert_close(w_q[8:16].float(), q0[8:16].float() * (1 / 3) ** 0.5, rtol=1e-2, atol=0)


def test_works_on_parameters_with_grad():
    w_q = torch.nn.Parameter(torch.ones(8, 4))
    w_k = torch.nn.Parameter(torch.ones(8, 4))
    assert clip_mha_(w_q, w_k, torch.tensor([400.0, 1.0]), 100.0, 2) == 1
    assert w_q.requires_grad and w_q.grad is None


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w: clip_mha_(w, w.clone(), torch.tensor([1.0, math.nan]), 1.0, 2, name="layers.3.self_attn"),
         r"\[layers\.3\.self_attn\].*non-finite"),
        (lambda w: clip_mha_(w, w.clone(), torch.tensor([1.0, math.inf]), 1.0, 2), "non-finite"),
        (lambda w: clip_mha_(w, w.clone(), torch.tensor([1.0, 2.0]), 0.0, 2), "tau"),
        (lambda w: clip_mha_(w, w.clone(), torch.tensor([1.0, 2.0, 3.0]), 1.0, 2), "shape"),
        (lambda w: clip_mha_(w, w.clone(), torch.tensor([1.0, 2.0, 3.0]), 1.0, 3), "multiple of 3"),
        (lambda w: clip_mha_(w, w.clone(), torch.tensor([1.0, 2.0]), 1.0, 2, alpha=1.5), "alpha"),
        (lambda w: clip_gqa_(w, w.clone(), torch.ones(4), 1.0, 4, 3), "multiple of num_kv_heads"),
        (lambda w: clip_gqa_(w, w[:2].clone(), torch.ones(2), 1.0, 2, 2), "head dim"),
        (lambda w: clip_mla_(w, w.clone(), torch.ones(2), 1.0, 2, 2, 1, 1), "expected 2 heads x 3"),
        (lambda w: clip_target_(QKClipTarget("mla", w, w, 2), torch.ones(2), 1.0), "needs qk_nope_head_dim"),
        (lambda w: clip_target_(QKClipTarget("mqa", w, w, 2), torch.ones(2), 1.0), "kind='mqa'"),
    ],
)
def test_bad_args(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.ones(8, 4))
