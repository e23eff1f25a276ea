"""ExpertParallelGroupedExperts == GroupedExperts on the full weights, forward and backward
(2 gloo ranks): with a receive permutation that is not the identity, an empty expert, and a
rank that sends nothing to another. Also: one host read per forward (the split sizes), and the
combine returned in flight (the MoE overlaps it with its shared experts)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from kimi_train.model.moe import GroupedExperts
from kimi_train.parallel import apply_ep
from kimi_train.parallel.expert_parallel import regroup_permutation

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
    with _HostReads() as reads:
        y = ep(x, counts[rank])
    # One host read (the 2R split sizes, one copy); every index op sized without a sync.
    assert reads.cpu_copies == 1 and not reads.syncing_ops, (reads.cpu_copies, reads.syncing_ops)
    # The combine comes back in flight: the MoE computes its shared experts before waiting on it.
    assert isinstance(y, funcol.AsyncCollectiveTensor) and not y.completed
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


class _HostReads(TorchDispatchMode):
    """Counts what would stall a GPU in the code it wraps: Tensor.cpu() calls, and the ops that
    read a device value on the host (item/int/bool, nonzero, repeat_interleave with no
    output_size). On CPU tensors none of them syncs, so they are counted by name."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")

    def __enter__(self):
        self.cpu_copies, self.syncing_ops = 0, []
        self._cpu = torch.Tensor.cpu
        reads = self

        def counted_cpu(t, *args, **kwargs):
            reads.cpu_copies += 1
            return reads._cpu(t, *args, **kwargs)

        torch.Tensor.cpu = counted_cpu
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.cpu = self._cpu
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name.startswith(self.SYNCING) or (name == "aten.repeat_interleave" and kwargs.get("output_size") is None):
            self.syncing_ops.append(str(func))
        return func(*args, **kwargs)


def test_regroup_permutation_orders_received_slots_by_expert_then_source():
    g = torch.Generator().manual_seed(0)
    for R, L in ((1, 3), (2, 3), (4, 2)):
        counts_RL = torch.randint(0, 4, (R, L), generator=g)
        counts_RL[0, 0] = 0  # an empty block
        # Received order: source rank r, then local expert l, then the slot within the block.
        received = [(r, l, i) for r in range(R) for l in range(L) for i in range(int(counts_RL[r, l]))]
        want = sorted(range(len(received)), key=lambda q: (received[q][1], received[q][0], received[q][2]))
        assert regroup_permutation(counts_RL, len(received)).tolist() == want
