"""Optimizer benchmark: optim.Muon vs torch.optim.Muon + AdamW (vs DeepSpeed when installed).

    python benchmarks/optim_bench.py                 # full run (CPU: well under 3 minutes)
    python benchmarks/optim_bench.py --quick         # smoke run (seconds)
    python benchmarks/optim_bench.py --json out.json --threads 2 --device cuda

torch's side runs at its best: torch.optim.Muon with AdamW(fused=True). Step time: median
ms per optimizer step over --iters steps after --warmup steps, every
variant on its own copy of the same parameters and gradients, measured side by side in
one process (interleaved: one step of each variant per round). Parameter sets:

- dense: the matrices of a small dense GPT (L layers, width d, MLP 4d: q, k, v, o, fc,
  proj per layer) for Muon, plus token embedding, lm_head and norms for AdamW.
- moe: a scaled-down K2 layer set: MLA pieces (q_a, q_b, kv_a_with_mqa, kv_b, o),
  router gate, shared expert, and 3-D routed experts [E, out, in] for Muon; norms for AdamW.
  torch.optim.Muon takes 2-D parameters only, so it gets every expert as its own 2-D
  parameter (same maths, E separate NS calls).

NS quality: singular-value range and update RMS (0.2 sqrt(max(n, m)) * NS(G)) of each
method on Gaussian G, against the SPEC's oracle for NS5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from optim import Muon, newton_schulz  # noqa: E402

RMS_ORACLE = {(1024, 1024): 0.18, (1024, 4096): 0.193, (512, 2048): 0.191}  # SPEC section 1


# ----------------------------------------------------------------------------- parameter sets


def dense_gpt_shapes(layers: int, d: int, vocab: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    muon = []
    for _ in range(layers):
        muon += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    adamw = [(vocab, d), (vocab, d)] + [(d,)] * (2 * layers + 1)
    return muon, adamw


def k2_moe_shapes(layers: int, d: int, experts: int, moe_width: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    heads, d_nope, d_rope, d_v = 8, 64, 32, 64
    r_q, r_kv = 3 * d // 8, d // 4
    muon, adamw = [], []
    for _ in range(layers):
        muon += [
            (r_q, d), (heads * (d_nope + d_rope), r_q), (r_kv + d_rope, d), (heads * (d_nope + d_v), r_kv), (d, heads * d_v),
            (experts, d),  # router gate
            (moe_width, d), (moe_width, d), (d, moe_width),  # shared expert
            (experts, moe_width, d), (experts, moe_width, d), (experts, d, moe_width),  # routed experts
        ]
        adamw += [(d,), (d,), (r_q,), (r_kv,)]
    return muon, adamw


def make_tensors(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).mul_(0.02).to(device) for s in shapes]


# ----------------------------------------------------------------------------- variants


def build_variant(name, muon_w, adamw_w, lr, wd):
    """Returns (step_fn, params_with_grads) for one variant on fresh copies of the weights."""
    muon_p = [nn.Parameter(w.clone()) for w in muon_w]
    adamw_p = [nn.Parameter(w.clone()) for w in adamw_w]
    if name.startswith("optim.Muon"):
        # optim.Muon[gram]: another NS method; optim.Muon[unchecked]: check_finite=False
        options = name.split("[")[1].rstrip("]").split(",") if "[" in name else []
        method = next((o for o in options if o != "unchecked"), "keller")
        opt = Muon(
            [{"params": muon_p, "use_muon": True}, {"params": adamw_p, "use_muon": False}],
            lr=lr, weight_decay=wd, ns_method=method, ns_dtype=torch.bfloat16,
            check_finite="unchecked" not in options,
        )
        return opt.step, muon_p + adamw_p
    if name == "torch.optim.Muon+AdamW":
        # torch.optim.Muon is 2-D only: a 3-D expert weight becomes E separate 2-D parameters
        flat = [nn.Parameter(p.detach()[e].clone()) for p in muon_p if p.ndim == 3 for e in range(p.shape[0])]
        flat += [p for p in muon_p if p.ndim == 2]
        muon = torch.optim.Muon(flat, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
        # at its best: the fused kernel (the default picks a per-tensor loop on a CPU, ~6x slower)
        adamw = torch.optim.AdamW(adamw_p, lr=lr, weight_decay=wd, betas=(0.9, 0.95), eps=1e-8, fused=True)

        def step():
            muon.step()
            adamw.step()

        return step, flat + adamw_p
    if name == "deepspeed.MuonWithAuxAdam":
        from deepspeed.runtime.zero.muon.original_muon import MuonWithAuxAdam  # noqa: F401 (import probe)

        groups = [dict(params=[p for p in muon_p if p.ndim == 2], use_muon=True, lr=lr, momentum=0.95, weight_decay=wd),
                  dict(params=adamw_p, use_muon=False, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)]
        opt = MuonWithAuxAdam(groups)
        return opt.step, groups[0]["params"] + adamw_p
    raise ValueError(f"unknown variant {name!r}")


def deepspeed_available() -> tuple[bool, str]:
    try:
        from deepspeed.runtime.zero.muon.original_muon import MuonWithAuxAdam  # noqa: F401
    except Exception as e:  # not installed (the default), or an old version without Muon
        return False, f"skipped: {type(e).__name__}: {e}"
    return True, ""


def _timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def time_side_by_side(steps: dict[str, Callable[[], None]], warmup: int, iters: int, device) -> dict[str, float]:
    """Median ms per step of each variant, the variants interleaved round by round so a
    load change on a shared machine hits them all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            times[name].append(_timed(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def set_grads(params, device, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)


# ----------------------------------------------------------------------------- NS quality


def ns_quality(shapes, device, dtype):
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, m in shapes:
        G = torch.randn(n, m, generator=g).to(device)
        for method in ("keller", "polar_express", "gram"):
            O = newton_schulz(G, method=method, dtype=dtype).double()
            s = torch.linalg.svdvals(O.cpu())
            rms = (O * 0.2 * math.sqrt(max(n, m))).pow(2).mean().sqrt().item()
            rows.append(dict(shape=f"{n}x{m}", method=method, dtype=str(dtype).replace("torch.", ""),
                             sv_min=s.min().item(), sv_max=s.max().item(), update_rms=rms,
                             oracle_rms=RMS_ORACLE.get((n, m))))
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (smoke run)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else 2  # plus the first step that checks each variant runs
    iters = args.iters if args.iters is not None else (3 if args.quick else 10)

    if args.quick:
        sets = {"dense": dense_gpt_shapes(2, 128, 1024), "moe": k2_moe_shapes(1, 128, 8, 64)}
        quality_shapes = [(128, 128), (128, 512)]
    else:
        sets = {"dense": dense_gpt_shapes(6, 512, 8192), "moe": k2_moe_shapes(2, 512, 16, 256)}
        quality_shapes = [(1024, 1024), (512, 2048)]

    # polar_express costs exactly what keller does (same GEMMs); its quality is in the NS table
    variants = ["optim.Muon", "optim.Muon[unchecked]", "optim.Muon[gram]", "torch.optim.Muon+AdamW"]
    ds_ok, ds_note = deepspeed_available()
    if ds_ok:
        variants.append("deepspeed.MuonWithAuxAdam")

    step_rows = []
    for set_name, (muon_shapes, adamw_shapes) in sets.items():
        muon_w, adamw_w = make_tensors(muon_shapes, device, 0), make_tensors(adamw_shapes, device, 1)
        n_muon = sum(w.numel() for w in muon_w)
        n_adamw = sum(w.numel() for w in adamw_w)
        steps = {}
        for name in variants:
            if name == "deepspeed.MuonWithAuxAdam" and any(w.ndim == 3 for w in muon_w):
                continue  # its Muon is 2-D only as well; not worth a second flattening path
            try:
                step, params = build_variant(name, muon_w, adamw_w, lr=2e-4, wd=0.1)
                set_grads(params, device)
                step()  # fails here, not mid-measurement, if a variant cannot run
                steps[name] = step
            except Exception as e:  # only DeepSpeed may fail here (distributed-only versions)
                if not name.startswith("deepspeed"):
                    raise
                ds_note = f"failed: {type(e).__name__}: {e}"
        results = time_side_by_side(steps, warmup, iters, device)
        for name, ms in results.items():
            print(f"[optim_bench] {set_name:5s} {name:28s} {ms:9.1f} ms/step", file=sys.stderr, flush=True)
        del steps
        ref = results["torch.optim.Muon+AdamW"]
        for name, ms in results.items():
            step_rows.append(dict(set=set_name, variant=name, median_ms=ms, ratio_vs_torch=ms / ref,
                                  muon_params=n_muon, adamw_params=n_adamw))

    quality = ns_quality(quality_shapes, device, torch.bfloat16)

    out = dict(
        command=" ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        cpu=platform.processor() or platform.machine(), threads=args.threads, torch=torch.__version__,
        warmup=warmup, iters=iters, ns_dtype="bfloat16", deepspeed=ds_note or "measured",
        step_time=step_rows, ns_quality=quality,
    )
    print(render_markdown(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def render_markdown(out: dict) -> str:
    lines = [f"Device: {out['device']}, threads {out['threads']}, torch {out['torch']}, NS in {out['ns_dtype']}, "
             f"median of {out['iters']} steps after {out['warmup']} warm-up. DeepSpeed MuonWithAuxAdam: {out['deepspeed']}.",
             "", "| set | variant | median ms/step | vs torch Muon+AdamW |", "|---|---|---:|---:|"]
    for r in out["step_time"]:
        lines.append(f"| {r['set']} ({r['muon_params'] / 1e6:.1f}M Muon + {r['adamw_params'] / 1e6:.1f}M AdamW) "
                     f"| {r['variant']} | {r['median_ms']:.1f} | {r['ratio_vs_torch']:.2f}x |")
    lines += ["", "| shape | method | sv min | sv max | update RMS | SPEC oracle (keller NS5) |", "|---|---|---:|---:|---:|---:|"]
    for r in out["ns_quality"]:
        oracle = f"{r['oracle_rms']:.3f}" if r["oracle_rms"] else "-"
        lines.append(f"| {r['shape']} | {r['method']} | {r['sv_min']:.3f} | {r['sv_max']:.3f} | {r['update_rms']:.3f} | {oracle} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
