"""ExpertParallelGroupedExperts == GroupedExperts on the full weights, forward and backward
(2 gloo ranks): with a receive permutation that is not the identity, an empty expert, and a
rank that sends nothing to another."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from kimi_train.model.moe import GroupedExperts
from kimi_train.parallel import apply_ep

from _spawn import spawn

E, D, I = 6, 8, 6  # 3 local experts per rank


def _worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    ref.init_weights(0.5, 0.5)
    ep = GroupedExperts(E, D, I)
    ep.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    apply_ep(torch.nn.Sequential(ep), mesh["ep"])
    # Per-rank token counts per global expert (rank 0 owns experts 0-2, rank 1 owns 3-5).
    # Both ranks send to rank 1's experts 3 and 4, so rank 1 receives blocks in (source, expert)
    # order [r0: 3, 1, 2 | r1: 1, 2, 0] and must regroup them by expert, [e3: 3, 1 | e4: 1, 2 |
    # e5: 2, 0]: a permutation that is not the identity. Rank 1 sends nothing to rank 0
    # (whose receive permutation is then the identity); expert 2 gets no token anywhere.
    counts = {0: torch.tensor([2, 1, 0, 3, 1, 2]), 1: torch.tensor([0, 0, 0, 1, 2, 0])}
    x_all = {r: torch.randn(int(c.sum()), D, generator=torch.Generator().manual_seed(10 + r)) for r, c in counts.items()}
    x = x_all[rank].clone().requires_grad_()
    y = ep(x, counts[rank])
    (y * (rank + 1)).sum().backward()

    for r in range(world):  # the reference sees every rank's tokens, one rank at a time
        x_ref = x_all[r].clone().requires_grad_()
        y_ref = ref(x_ref, counts[r])
        (y_ref * (r + 1)).sum().backward()
        if r == rank:
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # Local expert grads: the sum over every rank's tokens, for this rank's experts
    L = E // world
    for name in ("gate_proj", "up_proj", "down_proj"):
        got = getattr(ep, name).grad.to_local()
        want = getattr(ref, name).grad[rank * L : (rank + 1) * L]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dist.barrier()


def test_expert_parallel_matches_grouped_experts():
    spawn(_worker, 2)
