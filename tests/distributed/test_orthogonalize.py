"""optim.distributed.orthogonalize_dtensors / scale_rows_ on DTensors, 2 and 4 gloo ranks on CPU.

Oracle: Newton-Schulz (fp32, here) of the FULL matrix, sliced to the local shard. Owners run the
same fp32 NS on the same full matrix, only batched differently, so we ask for 1e-5 absolute
(NS outputs are O(1)).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from optim.distributed import comm_stats, orthogonalize_dtensors
from optim.layout import scale_rows_
from optim.newton_schulz import newton_schulz

from _spawn import spawn

ATOL = 1e-5


def ns_fp32(X: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic NS in fp32 on [B, n, m] (the test's own reference)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def _cases(world: int):
    """(mesh_shape, [(global_shape, placements), ...]) covering 1-D and 2-D meshes."""
    one_d = [
        ((10, 7), [Shard(0)]),  # uneven
        ((6, 9), [Shard(1)]),
        ((5, 5), [Replicate()]),
        ((3, 8), [Shard(0)]),  # 4 ranks: one empty shard
        ((4, 6, 5), [Shard(0)]),  # experts whole locally
        ((3, 6, 5), [Shard(0)]),  # uneven experts, whole locally
        ((2, 7, 4), [Shard(1)]),  # experts split inside the matrix
        ((7, 10), [Shard(0)]),  # same matrix shape as below: batched together
        ((7, 10), [Shard(1)]),
    ]
    a, b = (2, world // 2)
    two_d = [
        ((9, 11), [Shard(0), Shard(1)]),
        ((10, 6), [Replicate(), Shard(0)]),  # HSDP-like
        ((13, 5), [Shard(0), Shard(0)]),  # nested, uneven
        ((3, 5, 8), [Shard(2), Replicate()]),
        ((4, 6, 10), [Shard(0), Shard(2)]),
        ((4, 6, 3), [Shard(0), Shard(0)]),  # experts whole locally
    ]
    return [((world,), one_d), ((a, b), two_d)]


def _worker_orthogonalize(rank: int, world: int, expect_calls: int | None = 4) -> None:
    torch.manual_seed(0)
    meshes = {}
    updates, expected = [], []
    for mesh_shape, specs in _cases(world):
        names = ("a",) if len(mesh_shape) == 1 else ("a", "b")
        mesh = meshes.setdefault(mesh_shape, init_device_mesh("cpu", mesh_shape, mesh_dim_names=names))
        for shape, placements in specs:
            full = torch.randn(shape)  # same on every rank (same seed)
            ref = ns_fp32(full if full.ndim == 3 else full.unsqueeze(0))
            ref = ref if full.ndim == 3 else ref.squeeze(0)
            updates.append(distribute_tensor(full, mesh, placements))
            expected.append(distribute_tensor(ref, mesh, placements).to_local())

    calls = {"full_tensor": 0, "redistribute": 0}
    orig_full, orig_redist = DTensor.full_tensor, DTensor.redistribute

    def counting_full(self, *a, **k):
        calls["full_tensor"] += 1
        return orig_full(self, *a, **k)

    def counting_redist(self, *a, **k):
        calls["redistribute"] += 1
        return orig_redist(self, *a, **k)

    DTensor.full_tensor, DTensor.redistribute = counting_full, counting_redist
    if expect_calls is not None:
        comm_stats.reset()
    try:
        out = orthogonalize_dtensors(updates, updates, ns_fp32)
        out2 = orthogonalize_dtensors(updates, updates, ns_fp32)  # cached plan path
    finally:
        DTensor.full_tensor, DTensor.redistribute = orig_full, orig_redist
    assert calls == {"full_tensor": 0, "redistribute": 0}, calls
    if expect_calls is not None:
        assert comm_stats.calls == expect_calls  # two meshes x two calls: one bucket (all-to-all pair) each
    for i, (o, o2, e) in enumerate(zip(out, out2, expected)):
        assert o.shape == e.shape, (i, o.shape, e.shape)
        torch.testing.assert_close(o, e, atol=ATOL, rtol=0, msg=lambda m: f"param {i}: {m}")
        assert torch.equal(o, o2)


def _worker_local_only(rank: int, world: int) -> None:
    """Whole-locally experts and replicated matrices move zero bytes."""
    torch.manual_seed(1)
    mesh = init_device_mesh("cpu", (world,))
    ups = [distribute_tensor(torch.randn(2 * world, 5, 7), mesh, [Shard(0)]),
           distribute_tensor(torch.randn(6, 4), mesh, [Replicate()])]
    comm_stats.reset()
    out = orthogonalize_dtensors(ups, ups, ns_fp32)
    assert comm_stats.bytes_sent == comm_stats.bytes_recv == comm_stats.calls == 0
    torch.testing.assert_close(out[0], ns_fp32(ups[0].to_local()), atol=ATOL, rtol=0)
    bad = DTensor.from_local(torch.randn(4, 4), mesh, [Partial()])
    with pytest.raises(ValueError, match="Partial placements"):
        orthogonalize_dtensors([bad], [bad], ns_fp32)
    vec = distribute_tensor(torch.randn(8), mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"has shape \(8,\); valid: 2-D"):
        orthogonalize_dtensors([vec], [vec], ns_fp32)


def _worker_traffic(rank: int, world: int) -> None:
    """Per-rank bytes ~ 2 P/N for evenly divisible matrices (owner balance permitting)."""
    torch.manual_seed(2)
    mesh = init_device_mesh("cpu", (world,))
    ups = [distribute_tensor(torch.randn(16, 24), mesh, [Shard(0)]) for _ in range(4 * world)]
    comm_stats.reset()
    orthogonalize_dtensors(ups, ups, ns_fp32)
    P = sum(u.numel() * 4 for u in ups)
    expected = 2 * (P / world) * (world - 1) / world  # each shard leaves, each result comes back
    assert comm_stats.bytes_sent == pytest.approx(expected)
    assert comm_stats.bytes_recv == pytest.approx(expected)


def _worker_scale_rows(rank: int, world: int) -> None:
    torch.manual_seed(3)
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    for mesh, placements, shape in [
        (mesh1, [Shard(0)], (11, 6)),  # uneven: rows of a head span two shards
        (mesh1, [Shard(1)], (6, 9)),
        (mesh1, [Replicate()], (5, 3)),
        (mesh2, [Shard(0), Shard(0)], (13, 4)),
        (mesh2, [Replicate(), Shard(0)], (7, 4)),
    ]:
        full = torch.randn(shape)
        scale = torch.rand(shape[0]) + 0.5
        w = distribute_tensor(full.clone(), mesh, placements)  # Replicate may alias its input
        scale_rows_(w, scale)
        expected = distribute_tensor(full * scale[:, None], mesh, placements).to_local()
        assert torch.equal(w.to_local(), expected), (placements, shape)
    with pytest.raises(ValueError, match="row_scale has shape"):
        scale_rows_(w, torch.ones(3))


def _worker_muon_step(rank: int, world: int) -> None:
    """Muon (Muon + AdamW groups) on DTensor params == Muon on the full tensors, 3 steps (1e-6 abs);
    the AdamW group == torch.optim.AdamW."""
    from optim import Muon

    torch.manual_seed(4)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("a", "b"))
    specs = [((10, 7), [Shard(0), Replicate()]), ((6, 9), [Shard(1), Shard(0)]), ((4, 6, 5), [Shard(0), Shard(0)]),
             ((3, 5, 8), [Replicate(), Shard(1)]), ((5, 5), [Replicate(), Replicate()])]
    adamw_specs = [((9,), [Shard(0), Replicate()]), ((7, 3), [Replicate(), Shard(0)])]
    full = [torch.randn(s) for s, _ in specs + adamw_specs]
    ref_params = [torch.nn.Parameter(t.clone()) for t in full]
    dist_params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl)) for t, (_, pl) in zip(full, specs + adamw_specs)]
    kw = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32, ns_backend="torch")
    k = len(specs)
    opts = [Muon([{"params": ps[:k]}, {"params": ps[k:], "use_muon": False}], **kw) for ps in (ref_params, dist_params)]
    torch_params = [torch.nn.Parameter(t.clone()) for t in full[k:]]  # the AdamW side's own oracle
    torch_adamw = torch.optim.AdamW(torch_params, lr=0.05, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        for rp, dp_, (_, pl) in zip(ref_params, dist_params, specs + adamw_specs):
            g = torch.randn(rp.shape)
            rp.grad = g.clone()
            dp_.grad = distribute_tensor(g.clone(), mesh, pl)
        for tp, rp in zip(torch_params, ref_params[k:]):
            tp.grad = rp.grad.clone()
        for opt in opts + [torch_adamw]:
            opt.step()
        for tp, rp in zip(torch_params, ref_params[k:]):
            torch.testing.assert_close(rp.detach(), tp.detach(), atol=1e-6, rtol=0, msg=lambda m: f"AdamW side: {m}")
        for i, (rp, dp_) in enumerate(zip(ref_params, dist_params)):
            expected = distribute_tensor(rp.detach().clone(), mesh, dp_.placements).to_local()
            torch.testing.assert_close(dp_.to_local(), expected, atol=1e-6, rtol=0, msg=lambda m: f"param {i}: {m}")


def _worker_plan_cache_positions(rank: int, world: int) -> None:
    """The same layouts at other positions of the list get their own plan (a cached plan is by position)."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(7)
    full = [torch.randn(5, 5), torch.randn(8, 4)]
    placements = [[Replicate()], [Shard(0)]]
    dts = [distribute_tensor(t, mesh, pl) for t, pl in zip(full, placements)]

    def ns_fn(X):
        return newton_schulz(X, dtype=torch.float32, backend="torch")

    orthogonalize_dtensors(dts, dts, ns_fn)
    (out,) = orthogonalize_dtensors(dts[1:], dts[1:], ns_fn)  # the Shard(0) matrix alone, now at position 0
    expected = distribute_tensor(ns_fn(full[1]), mesh, [Shard(0)]).to_local()
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=0)


def _worker_many_buckets(rank: int, world: int) -> None:
    """Tiny buckets: every matrix travels alone, two buckets in flight, results unchanged."""
    import optim.distributed as od

    saved = od.BUCKET_NUMEL
    od.BUCKET_NUMEL = 30  # smaller than every matrix of the cases: one bucket per matrix
    try:
        comm_stats.reset()
        _worker_orthogonalize(rank, world, expect_calls=None)
        assert comm_stats.calls > 8, comm_stats.calls
        _worker_muon_step(rank, world)
    finally:
        od.BUCKET_NUMEL = saved


def _worker_plan_mismatch(rank: int, world: int) -> None:
    """Ranks that disagree on the matrices fail together, in one clear error, instead of hanging."""
    mesh = init_device_mesh("cpu", (world,))
    cols = 6 if rank == 0 else 7  # rank 0 has another shape
    ups = [distribute_tensor(torch.zeros(8, 5), mesh, [Shard(0)]),
           DTensor.from_local(torch.randn(8 // world, cols), mesh, [Shard(0)], shape=(8, cols), stride=(cols, 1))]
    with pytest.raises(ValueError, match=r"planned other Muon matrices than ranks \[.*\].*same order, with the same shapes"):
        orthogonalize_dtensors(ups, ups, ns_fp32)


def _worker_all(rank: int, world: int) -> None:
    _worker_plan_cache_positions(rank, world)
    _worker_orthogonalize(rank, world)
    _worker_muon_step(rank, world)
    _worker_many_buckets(rank, world)
    _worker_plan_mismatch(rank, world)
    _worker_local_only(rank, world)
    _worker_traffic(rank, world)
    _worker_scale_rows(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_orthogonalize_muon_and_scale_rows(world):
    """One process group per world size (spawning dominates): every check above, in order."""
    spawn(_worker_all, world)


def test_plain_tensor_scale_rows():
    w = torch.ones(4, 3)
    scale_rows_(w, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(w[:, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
