"""FSDP2 vs DeepSpeed ZeRO-1/2/3 on the same model and optimizer, 2 ranks (gloo on CPU, NCCL on GPUs).

    python benchmarks/engine_bench.py                              # model=tiny, all variants
    python benchmarks/engine_bench.py --model small --steps 10 --out engine_bench.json

Variants, each in a fresh set of processes, the same model, global batch and MuonClip settings:

    fsdp2           kimi-train's default engine: FSDP2 + optim.MuonClip (owner-computes NS)
    zero1/2/3       parallel.engine=deepspeed: ZeRO stage S + optim.flat.PartitionedMuonClip
    ds-muon-zero1/2/3  peer: DeepSpeed's own Muon ("optimizer": {"type": "Muon"}; no QK-Clip,
                    Keller's lr scale, its default gradient_clipping 1.0 on the orthogonalised
                    update; ZeRO-3 needs "reduce_scatter": false), timed, not checked for maths

Per variant, max over ranks: median step time (forward + backward + optimizer step) after warm-up
and the median process CPU time of a step (all of a rank's threads: less disturbed by a shared machine),
peak resident memory growth of a rank since before the model was built (RSS: on CPU everything
a rank holds; on CUDA also max_memory_allocated), and the bytes one rank receives per step in
collectives, counted by wrapping torch.distributed (ring-equivalent: all-gather and reduce-scatter
(N-1)/N of the full tensor, all-reduce twice that, all-to-all what its output splits say arrives
from the other ranks, broadcast the tensor); of which the all-to-alls (the Muon exchange: no
engine here uses them otherwise). Prints a markdown table; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ["fsdp2", "zero1", "zero2", "zero3", "ds-muon-zero1", "ds-muon-zero2", "ds-muon-zero3"]

# ---------------------------------------------------------------------------- byte counting
_received = [0]
_received_a2a = [0]  # of which all-to-all: the Muon owner-computes exchange (no engine here uses it otherwise)


def _count_collectives() -> None:
    """Wrap torch.distributed's collectives (before DeepSpeed caches them) to count received bytes."""

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    def world(kwargs) -> int:
        return dist.get_world_size(kwargs.get("group"))

    def _all_to_all_received(a, k) -> int:  # what arrives from the other ranks: the splits say (a self-split stays)
        out = a[0] if a else k["output"]
        splits = a[2] if len(a) > 2 else k.get("output_split_sizes")
        if not splits:
            return nbytes(out) * (world(k) - 1) // world(k)
        return (sum(splits) - splits[dist.get_rank(k.get("group"))]) * out.element_size()

    rules = {
        "all_reduce": lambda a, k: 2 * nbytes(a[0] if a else k["tensor"]) * (world(k) - 1) // world(k),
        "all_gather_into_tensor": lambda a, k: nbytes(a[0] if a else k["output_tensor"]) * (world(k) - 1) // world(k),
        "_all_gather_base": lambda a, k: nbytes(a[0] if a else k["output_tensor"]) * (world(k) - 1) // world(k),
        "all_gather": lambda a, k: sum(map(nbytes, a[0] if a else k["tensor_list"])) * (world(k) - 1) // world(k),
        "all_gather_single": lambda a, k: nbytes(a[0] if a else k["output_tensor"]) * (world(k) - 1) // world(k),
        "reduce_scatter_single": lambda a, k: nbytes(a[1] if len(a) > 1 else k["input"]) * (world(k) - 1) // world(k),
        "reduce_scatter_tensor": lambda a, k: nbytes(a[1] if len(a) > 1 else k["input"]) * (world(k) - 1) // world(k),
        "_reduce_scatter_base": lambda a, k: nbytes(a[1] if len(a) > 1 else k["input"]) * (world(k) - 1) // world(k),
        "all_to_all_single": _all_to_all_received,
        "broadcast": lambda a, k: nbytes(a[0] if a else k["tensor"]),
    }
    for name, rule in rules.items():
        original = getattr(dist, name, None)
        if original is None:  # not in this torch
            continue

        def wrapped(*args, __original=original, __rule=rule, __name=name, **kwargs):
            try:
                nbytes_ = __rule(args, kwargs)
                _received[0] += nbytes_
                _received_a2a[0] += nbytes_ if __name == "all_to_all_single" else 0
            except Exception:  # an unusual call form: count nothing rather than fail the run
                pass
            return __original(*args, **kwargs)

        setattr(dist, name, wrapped)


# ---------------------------------------------------------------------------- one variant on one rank
def _config(model: str, variant: str, micro_batch: int, seq_len: int):
    from hydra import compose, initialize_config_dir

    from kimi_train.config import TrainConfig, register_configs
    from omegaconf import OmegaConf

    register_configs()
    overrides = [f"model={model}", f"train.micro_batch_size={micro_batch}", f"train.seq_len={seq_len}",
                 "optim.ns_dtype=fp32", "optim.qk_clip.tau=100"]
    if variant.startswith(("zero", "ds-muon")):
        overrides += ["parallel.engine=deepspeed", f"parallel.zero_stage={variant[-1]}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    assert isinstance(cfg, TrainConfig)
    return cfg


def _build(cfg, variant: str, device: torch.device):
    """(forward_backward(batch) -> loss, step()) for the variant: ours through the trainer's engines."""
    from kimi_train.model import KimiForCausalLM
    from kimi_train.parallel import ParallelDims, build_engine

    torch.manual_seed(0)
    with torch.device(device):
        model = KimiForCausalLM(cfg.model)
    dims = ParallelDims.from_config(cfg.parallel, dist.get_world_size(), cfg.model)

    def loss_of(net, batch):
        logits = net(batch[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    if variant == "fsdp2" or variant.startswith("zero"):
        mesh = dims.build_mesh(device.type) if variant == "fsdp2" else None
        engine = build_engine(cfg, model, dims, mesh, device, 1, mixed_precision=False)
        return (lambda batch: engine.forward_backward([batch], lambda mb: loss_of(engine.model, mb))), \
            (lambda: engine.step(cfg.optim.lr))
    import deepspeed  # DeepSpeed's own Muon
    from kimi_train.parallel.deepspeed_engine import deepspeed_config

    config = deepspeed_config(cfg, dims.dp_size, 1)
    config.pop("gradient_clipping")  # DeepSpeed's default (1.0), as its users get it
    config["optimizer"] = {"type": "Muon", "params": {"lr": cfg.optim.lr, "momentum": cfg.optim.momentum,
                                                      "weight_decay": cfg.optim.weight_decay}}
    if cfg.parallel.zero_stage == 3:
        config["zero_optimization"]["reduce_scatter"] = False  # what its ZeRO-3 Muon requires
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                           dist_init_required=False)
    return (lambda batch: (lambda loss: (engine.backward(loss), loss)[1])(loss_of(engine, batch))), engine.step


def _worker(rank: int, world: int, args, variant: str) -> dict:
    """One rank under kimi_train.parallel.spawn (which initialises the group and tears it down)."""
    torch.set_num_threads(args.threads)
    _count_collectives()
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    result: dict = {"variant": variant}
    fwd_bwd = step = None
    try:
        cfg = _config(args.model, variant, args.micro_batch, args.seq_len)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fwd_bwd, step = _build(cfg, variant, device)
        g = torch.Generator().manual_seed(rank)
        times, cpu, received, received_a2a = [], [], [], []
        for i in range(args.warmup + args.steps):
            batch = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g).to(device)
            dist.barrier()
            _received[0] = _received_a2a[0] = 0
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(batch)
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                received.append(_received[0])
                received_a2a.append(_received_a2a[0])
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # ru_maxrss: KiB on Linux
        result.update(step_s=statistics.median(times), cpu_s=statistics.median(cpu), peak_rss_growth_bytes=rss,
                      recv_bytes_per_step=max(received), muon_recv_bytes_per_step=max(received_a2a))
        if device.type == "cuda":
            result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as e:  # a peer that does not run here is a result too
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    fwd_bwd = step = None  # the engine and its groups go now, not during interpreter finalisation
    return result


def _run_variant(args, variant: str) -> dict:
    from kimi_train.parallel.spawn import spawn

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the ranks inherit it (DeepSpeed reads it at import)
    per_rank = spawn(_worker, args.ranks, args, variant, backend="nccl" if torch.cuda.is_available() else "gloo")
    errors = [r["error"] for r in per_rank if "error" in r]
    if errors:
        return {"variant": variant, "error": errors[0]}
    merged = {"variant": variant}
    for key in per_rank[0]:
        if key != "variant":
            merged[key] = max(r[key] for r in per_rank)  # the slowest / largest rank
    return merged


def table(results: list[dict], model: str, num_params: int, num_muon: int, ranks: int) -> str:
    """P: fp32 bytes of all parameters; P_muon: of the Muon matrices. The Muon exchange is the
    all-to-all traffic (the owner-computes NS), in the bench's NS dtype (fp32)."""
    lines = ["| engine | step (ms) | CPU (ms) | peak RSS growth / rank (MiB) | received / rank / step (MiB) | received / P "
             "| of which Muon all-to-all (MiB) | Muon all-to-all / (P_muon / N) |", "|---|---|---|---|---|---|---|---|"]
    P, P_muon = 4 * num_params, 4 * num_muon
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | did not run: {r['error']} | | | | | | |")
            continue
        a2a = r.get("muon_recv_bytes_per_step", 0)
        cpu = 1e3 * r.get("cpu_s", float("nan"))
        lines.append(f"| {r['variant']} | {1e3 * r['step_s']:.0f} | {cpu:.0f} | {r['peak_rss_growth_bytes'] / 2**20:.0f} | "
                     f"{r['recv_bytes_per_step'] / 2**20:.2f} | {r['recv_bytes_per_step'] / P:.2f} | "
                     f"{a2a / 2**20:.2f} | {a2a / (P_muon / ranks):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    import tempfile

    from kimi_train.model import KimiForCausalLM, load_model_config

    from optim import muon_param_groups

    model = KimiForCausalLM(load_model_config(args.model))
    num_params = sum(p.numel() for p in model.parameters())
    num_muon = sum(p.numel() for g in muon_param_groups(model) if g["use_muon"] for p in g["params"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for variant in args.variants.split(","):
            results.append(_run_variant(args, variant))
            print(json.dumps(results[-1]), flush=True)
    report = {"model": args.model, "num_params": num_params, "num_muon_params": num_muon, "ranks": args.ranks, "micro_batch": args.micro_batch,
              "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "results": results}
    print(table(results, args.model, num_params, num_muon, args.ranks))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
