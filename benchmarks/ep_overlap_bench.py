"""Expert parallelism on CPU (gloo, 2 ranks): one MoE layer's forward + backward with the combine
all_to_all overlapped with the shared expert (the default) and with it waited at once.

    python benchmarks/ep_overlap_bench.py                 # ~30 s on 2 cores
    python benchmarks/ep_overlap_bench.py --tokens 4096 --hidden 512 --reps 20

Each rank routes its tokens through a k2_mini-shaped MoE layer (top-2 of --experts, a shared
expert of the expert width) whose routed experts are sharded over the 2 ranks. The two modes
alternate rep by rep (A B A B ...) so load from other processes lands on both; the median per
mode is reported. On a GPU the overlap hides the combine's wire time behind the shared
expert's GEMMs; on CPU gloo's worker thread sends while the main thread computes, so what this
measures is bounded by 2 cores shared by 2 ranks and their gloo threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank: int, world: int, args) -> dict:
    """One rank under kimi_train.parallel.spawn (gloo, 1 thread; it also tears the group down)."""
    from torch.distributed.device_mesh import init_device_mesh

    from kimi_train.model import MoE, load_model_config
    from kimi_train.parallel import apply_ep
    from kimi_train.parallel import expert_parallel

    cfg = load_model_config("k2_mini", hidden_size=args.hidden, moe_intermediate_size=args.width,
                            n_routed_experts=args.experts)
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.init_weights(0.02, 0.02)
    apply_ep(moe, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))["ep"])
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    overlapped = expert_parallel._all_to_all

    def waited(*a, **k):  # the combine waited where it is issued: nothing left to overlap
        return overlapped(*a, **{**k, "wait": True})

    times = {"overlap": [], "wait": []}
    for i in range(args.warmup + args.reps):
        for mode in ("overlap", "wait"):
            expert_parallel._all_to_all = overlapped if mode == "overlap" else waited
            dist.barrier()
            t0 = time.perf_counter()
            moe(x).sum().backward()
            if i >= args.warmup:
                times[mode].append(1000 * (time.perf_counter() - t0))
    expert_parallel._all_to_all = overlapped
    return {**{k: statistics.median(v) for k, v in times.items()}, "config": vars(args)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--width", type=int, default=256, help="expert (and shared expert) width")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    from kimi_train.parallel.spawn import spawn

    result = spawn(worker, 2, args)[0]
    print(f"MoE layer forward + backward, 2 gloo ranks, {args.tokens} tokens per rank, median of {args.reps}: "
          f"overlapped {result['overlap']:.1f} ms, waited {result['wait']:.1f} ms "
          f"(overlapped / waited = {result['overlap'] / result['wait']:.3f})")


if __name__ == "__main__":
    main()
