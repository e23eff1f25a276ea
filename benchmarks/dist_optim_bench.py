"""Distributed Muon step on CPU gloo ranks: ours vs a fair gather baseline vs torchtitan's DistMuon.

    python benchmarks/dist_optim_bench.py                      # 2 and 4 ranks, every set, ~5 min idle
    python benchmarks/dist_optim_bench.py --ranks 2 --sets peer --iters 10 --json out.json

Every variant runs one Muon step (momentum, Newton-Schulz of each whole matrix, decoupled
decay, update scale 0.2 sqrt(max(n, m))) on FSDP-style parameters: DTensors sharded Shard(0)
over a 1-D mesh, one rank per process, 1 thread per rank (--threads-per-rank), NS in bf16.
Only the way whole matrices are formed differs:

- ours: ``optim.Muon`` (``ns_method=keller``, the default; ``ours[gram]``: the same iteration
  carried out on the Gram matrix, equal to keller in fp64, fewer FLOPs on rectangular
  matrices): each matrix NS'd once by one owner rank (LPT-balanced on NS cost),
  buckets of ~``optim.distributed.BUCKET_NUMEL`` elements, one packed all-to-all per bucket
  each way in the NS dtype, the next bucket's all-to-all in flight during this bucket's NS.
- gather: the same ``optim.Muon`` with its orthogonalisation swapped for what torch.optim.Muon
  on DTensors and ZeRO-style Muon do, done well: per bucket (same buckets), ONE coalesced
  all-gather of the local shards in the NS dtype (posted a bucket ahead), NS of every full
  matrix on every rank, keep the local rows. Weights already whole on their rank (experts
  split on their expert dim) are not gathered, as in ours.
- torchtitan: torchtitan 0.3.0's ``DistMuon`` (``benchmarks/peers/torchtitan_dist_muon.py``:
  owner-computes layout, one bucket per layer, two buckets in flight), when installed; skipped
  with a note otherwise. It needs two shims to run on gloo (see that file).

Parameter sets: "dense" = a GPT of d 384, 4 layers (q/k/v/o 384x384, gate/up 1024x384, down
384x1024); "moe" = dense plus 2 layers of 8 experts x 3 matrices [8, 192, 384]; "peer" = 6
layers of d 512 (q, k, v, o 512x512, MLP 2048x512 and 512x2048) plus 2 x [16, 256, 512]
experts (the workload of the torchtitan comparison in the issue).

Timing: the variants are interleaved step by step (a load change hits them all alike); a
step's time is the slowest rank's (barrier before and after); median over --iters steps after
--warmup; "CPU ms" is the busiest rank's process CPU time in the step (all its threads),
which a shared machine disturbs less than wall time. Bytes: what a rank RECEIVES in collectives during one step (self-copies excluded),
max over ranks, as a multiple of P/N (P = fp32 bytes of all Muon matrices, N = ranks).
Same maths: every variant gets the same gradients; "weights vs ours" is the largest weight
difference from ours after all steps, relative to the largest distance ours moved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # optim, kimi_train
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peers
import optim.distributed as od  # noqa: E402
from optim import Muon  # noqa: E402
from optim.newton_schulz import orthogonalize_local_  # noqa: E402

LR, WD = 0.02, 0.1


# ----------------------------------------------------------------------------- parameter sets


def dense_set(d: int = 384, ffn: int = 1024, layers: int = 4) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for l in range(layers):
        out += [(f"layers.{l}.attn.{w}", (d, d)) for w in "qkvo"]
        out += [(f"layers.{l}.mlp.gate", (ffn, d)), (f"layers.{l}.mlp.up", (ffn, d)), (f"layers.{l}.mlp.down", (d, ffn))]
    return out


def moe_set() -> list[tuple[str, tuple[int, ...]]]:
    experts = [(f"layers.{l}.experts.{w}", s) for l in range(2) for w, s in
               (("w1", (8, 192, 384)), ("w3", (8, 192, 384)), ("w2", (8, 384, 192)))]
    return dense_set() + experts


def peer_set() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for l in range(6):
        out += [(f"layers.{l}.attn.{w}", (512, 512)) for w in "qkvo"]
        out += [(f"layers.{l}.mlp.fc", (2048, 512)), (f"layers.{l}.mlp.proj", (512, 2048))]
    return out + [("experts.0", (16, 256, 512)), ("experts.1", (16, 256, 512))]


SETS = {"dense": dense_set, "moe": moe_set, "peer": peer_set}


# ----------------------------------------------------------------------------- the fair baseline


def gather_orthogonalize_(params, ns, ns_dtype, fill, apply, bucket_numel=None) -> None:
    """optim.distributed.orthogonalize_'s contract, done the gather way (Shard(0) on a 1-D mesh).

    Per bucket: every rank fills its local shards into one flat buffer, ONE all-gather (posted
    one bucket ahead), then every rank assembles every full matrix, NS's all of them, and
    applies its own rows. Whole-locally weights are NS'd locally, not gathered.
    """
    bucket_numel = bucket_numel or od.BUCKET_NUMEL
    local, sharded = [], []
    for i, p in enumerate(params):
        if od._is_whole_locally(p):
            local.append((i, p.to_local().shape, p.to_local().device))
        else:
            if tuple(p.placements) != (Shard(0),) or p.shape[0] % p.device_mesh.size():
                raise ValueError(f"the gather baseline takes even Shard(0) matrices, got {tuple(p.shape)} {p.placements}")
            sharded.append(i)
    buckets, cur, size = [], [], 0
    for i in sharded:
        cur.append(i)
        size += params[i].numel()
        if size >= bucket_numel:
            buckets.append(cur)
            cur, size = [], 0
    if cur:
        buckets.append(cur)
    if not buckets:
        orthogonalize_local_(local, ns, ns_dtype, fill, apply)
        return
    mesh = params[sharded[0]].device_mesh
    pg, world, me = mesh.get_group(0), mesh.size(), mesh.get_local_rank()
    device = params[sharded[0]].to_local().device

    def post(bucket):
        shards = [params[i].to_local() for i in bucket]
        n_local = sum(s.numel() for s in shards)
        send = torch.empty(n_local, dtype=ns_dtype, device=device)
        pos = 0
        for i, s in zip(bucket, shards):
            fill(i, (), send[pos : pos + s.numel()].view(s.shape))
            pos += s.numel()
        recv = torch.empty(world * n_local, dtype=ns_dtype, device=device)
        work = dist.all_gather_single(recv, send, group=pg, async_op=True)
        od.comm_stats.bytes_recv += (world - 1) * n_local * send.element_size()
        return recv.view(world, n_local), work

    def run(bucket, recv, work):
        work.wait()
        offsets, pos = {}, 0
        for i in bucket:
            offsets[i] = pos
            pos += params[i].to_local().numel()

        def fill_full(i, key, out):  # rank r's rows of matrix i sit at offsets[i] in row r of recv
            rows = params[i].shape[0] // world
            for r in range(world):
                out[r * rows : (r + 1) * rows].copy_(recv[r, offsets[i] : offsets[i] + rows * params[i].shape[1]].view(rows, -1))

        def apply_mine(i, key, O):
            rows = params[i].shape[0] // world
            apply(i, (), O[me * rows : (me + 1) * rows])

        orthogonalize_local_([(i, params[i].shape, device) for i in bucket], ns, ns_dtype, fill_full, apply_mine)

    pending = [post(buckets[0])] + ([post(buckets[1])] if len(buckets) > 1 else [])
    orthogonalize_local_(local, ns, ns_dtype, fill, apply)
    for k, bucket in enumerate(buckets):
        recv, work = pending[k]
        if k + 2 < len(buckets):
            pending.append(post(buckets[k + 2]))
        run(bucket, recv, work)


@contextmanager
def counting_collectives(world: int):
    """Count the bytes this rank receives in the all-to-alls and all-gathers of any variant."""
    counter = {"recv": 0}
    a2a, ag = dist.all_to_all_single, dist.all_gather_single

    def a2a_counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        rank = dist.get_rank(group)
        own = (output_split_sizes[rank] if output_split_sizes else output.numel() // world)
        counter["recv"] += (output.numel() - own) * output.element_size()
        return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def ag_counted(output, input, group=None, async_op=False):
        counter["recv"] += (output.numel() - input.numel()) * output.element_size()
        return ag(output, input, group=group, async_op=async_op)

    dist.all_to_all_single, dist.all_gather_single = a2a_counted, ag_counted
    try:
        yield counter
    finally:
        dist.all_to_all_single, dist.all_gather_single = a2a, ag


# ----------------------------------------------------------------------------- one rank


def _variant_step(name, names, named, mesh):
    """(step function, params) for one variant on its own copy of the parameters."""
    params = [torch.nn.Parameter(DTensor.from_local(w.clone(), mesh, [Shard(0)], shape=shape, stride=stride))
              for w, shape, stride in named]
    if name == "torchtitan":
        from peers import torchtitan_dist_muon as tt

        return tt.build_step(list(zip(names, params)), mesh, lr=LR, weight_decay=WD), params
    method = "gram" if name == "ours[gram]" else "keller"
    opt = Muon(params, lr=LR, weight_decay=WD, ns_dtype=torch.bfloat16, ns_backend="torch", ns_method=method)
    if name.startswith("ours"):
        return opt.step, params

    def gather_step():
        saved = od.orthogonalize_
        od.orthogonalize_ = gather_orthogonalize_  # what Muon calls for DTensors (read on every step)
        try:
            opt.step()
        finally:
            od.orthogonalize_ = saved

    return gather_step, params


def _worker(rank: int, world: int, args) -> list[dict]:
    """One rank under kimi_train.parallel.spawn (gloo, which also tears the group down); rank 0's rows."""
    torch.set_num_threads(args.threads_per_rank)
    mesh = init_device_mesh("cpu", (world,))
    variants = ["ours", "ours[gram]", "gather"] + (["torchtitan"] if args.torchtitan_ok else [])
    rows = []
    for set_name in args.sets.split(","):
        named_shapes = SETS[set_name]()
        gen = torch.Generator().manual_seed(0)
        named = []
        for _, shape in named_shapes:
            full = torch.randn(shape, generator=gen) * 0.02
            rows_per = shape[0] // world
            named.append((full[rank * rows_per : (rank + 1) * rows_per].contiguous(), torch.Size(shape), full.stride()))
        P = sum(torch.Size(s).numel() * 4 for _, s in named_shapes)
        steps = {}
        for v in variants:
            step, params = _variant_step(v, [n for n, _ in named_shapes], named, mesh)
            steps[v] = (step, params)
        times = {v: [] for v in variants}
        cpu_times = {v: [] for v in variants}
        recv = {v: 0 for v in variants}
        for it in range(args.warmup + args.iters):
            for v, (step, params) in steps.items():
                g = torch.Generator().manual_seed(1000 + it)
                for p in params:
                    local = torch.randn(p.to_local().shape, generator=g)
                    p.grad = DTensor.from_local(local, mesh, p.placements, shape=p.shape, stride=p.stride())
                dist.barrier()
                with counting_collectives(world) as counter:
                    t0, c0 = time.perf_counter(), time.process_time()
                    step()
                    cpu = time.process_time() - c0
                    dist.barrier()
                    dt = time.perf_counter() - t0
                slowest = torch.tensor([dt, float(counter["recv"]), cpu], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if it >= args.warmup:
                    times[v].append(float(slowest[0]))
                    cpu_times[v].append(float(slowest[2]))
                recv[v] = int(slowest[1])
        # Same maths? Every variant saw the same gradients: compare its weights with ours, against
        # how far ours moved (bf16 NS noise is ~1% of that; the same algorithm stays well under it).
        ours = [p.to_local() for p in steps["ours"][1]]
        moved = torch.tensor([max(float((p - w).abs().max()) for p, (w, _, _) in zip(ours, named))])
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        for v in variants:
            diff = torch.tensor([max(float((p.to_local() - q).abs().max()) for p, q in zip(steps[v][1], ours))])
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            rows.append(dict(set=set_name, variant=v, ranks=world, P_bytes=P, step_ms=1e3 * statistics.median(times[v]),
                             cpu_ms=1e3 * statistics.median(cpu_times[v]),
                             step_ms_all=[1e3 * t for t in times[v]], max_recv_bytes=recv[v],
                             recv_over_P_per_N=recv[v] / (P / world),
                             weights_vs_ours=float(diff) / float(moved)))
        del steps
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4", help="comma-separated world sizes")
    ap.add_argument("--sets", default="dense,moe,peer", help=f"comma-separated parameter sets: {', '.join(SETS)}")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    for s in args.sets.split(","):
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r}; valid: {', '.join(SETS)}")

    from peers import torchtitan_dist_muon as tt

    args.torchtitan_ok, tt_note = tt.available()
    from kimi_train.parallel.spawn import spawn

    rows = []
    for world in [int(r) for r in args.ranks.split(",")]:
        rows += spawn(_worker, world, args)[0]
    by_key = {(r["set"], r["ranks"], r["variant"]): r for r in rows}
    for r in rows:
        r["time_vs_gather"] = r["step_ms"] / by_key[(r["set"], r["ranks"], "gather")]["step_ms"]
        tt_row = by_key.get((r["set"], r["ranks"], "torchtitan"))
        r["time_vs_torchtitan"] = r["step_ms"] / tt_row["step_ms"] if tt_row else None
    out = dict(
        command=" ".join(["python", "benchmarks/dist_optim_bench.py"] + (argv if argv is not None else sys.argv[1:])),
        cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
        threads_per_rank=args.threads_per_rank, iters=args.iters, warmup=args.warmup, ns_dtype="bfloat16",
        bucket_numel=od.BUCKET_NUMEL, torchtitan="measured" if args.torchtitan_ok else tt_note, rows=rows,
    )
    print(render_markdown(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def render_markdown(out: dict) -> str:
    lines = [f"CPU gloo ranks, {out['threads_per_rank']} thread per rank, torch {out['torch']}, NS in {out['ns_dtype']}, "
             f"median of {out['iters']} steps after {out['warmup']} warm-up, variants interleaved. "
             f"torchtitan DistMuon: {out['torchtitan']}.",
             "", "| set | ranks | variant | median ms/step | vs gather | vs torchtitan | CPU ms/step | recv MB/rank "
             "| recv / (P/N) | weights vs ours |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        vs_tt = f"{r['time_vs_torchtitan']:.2f}x" if r["time_vs_torchtitan"] is not None else "-"
        lines.append(f"| {r['set']} | {r['ranks']} | {r['variant']} | {r['step_ms']:.1f} | {r['time_vs_gather']:.2f}x | "
                     f"{vs_tt} | {r['cpu_ms']:.0f} | {r['max_recv_bytes'] / 1e6:.2f} | {r['recv_over_P_per_N']:.2f} | {r['weights_vs_ours']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
