"""GPU kernel benchmark: Newton-Schulz, grouped expert MLP and per-head max logits.

One command on one GPU (about 5 minutes on an H200):

    python benchmarks/gpu_kernels.py --out results/gpu_kernels.json

prints a markdown table per section plus the acceptance checks, and writes
everything to JSON. ``--cpu-smoke`` runs every section at tiny shapes through
Triton's interpreter on CPU: it checks that the script works, its numbers mean
nothing. Each section is wrapped so one failure does not lose the others.

Timing: CUDA events, median of ``--reps`` runs after ``--warmup`` runs (the
warm-up also compiles and autotunes the Triton kernels for that shape).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_kernels.json", help="where to write the JSON results")
    p.add_argument("--sections", default="ns,grouped_mlp,max_logits",
                   help="comma-separated subset to run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every section in this process (default on GPU: one subprocess per section, so a "
                        "CUDA fault or hang in one kernel cannot take the others down)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kimi_train.kernels.grouped_gemm import grouped_gemm  # noqa: E402
from kimi_train.kernels.grouped_gemm import resolve_backend as grouped_gemm_backend  # noqa: E402
from kimi_train.kernels.max_logits_triton import max_logits_triton  # noqa: E402
from kimi_train.model.max_logits import per_head_max_logits  # noqa: E402
from optim.newton_schulz import newton_schulz  # noqa: E402

# Acceptance targets of issue 5.
NS_MIN_SPEEDUP = 1.6  # Triton NS over torch NS at 4096 x 4096, bf16, 5 steps
GROUPED_MIN_VS_LOOP = 4.0  # grouped expert MLP (fwd+bwd) over the per-expert loop
GROUPED_MIN_VS_GROUPED_MM = 1.0  # ... and over torch grouped_mm
MAX_LOGIT_MAX_FRACTION = 0.15  # max-logit kernel time / flash SDPA forward time at seq 4096

# Wall-clock limit per section when isolated (seconds); the sum stays within 8 minutes.
SECTION_TIMEOUT_S = {"ns": 180, "grouped_mlp": 120, "max_logits": 90}


def timer(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Newton-Schulz


def ns_shapes(smoke: bool):
    """(label, batch, rows, cols) in the weight's own orientation (NS transposes tall ones)."""
    if smoke:
        return [("square 48", 1, 48, 48), ("experts 2x24x40", 2, 24, 40)]
    squares = [(f"square {n}", 1, n, n) for n in (1024, 2048, 4096, 8192)]
    k2 = [  # Kimi K2: hidden 7168, 64 heads, q_lora 1536, kv_lora 512, moe width 2048
        ("K2 experts gate/up 16x2048x7168", 16, 2048, 7168),
        ("K2 experts down 16x7168x2048", 16, 7168, 2048),
        ("K2 q_a_proj 1536x7168", 1, 1536, 7168),
        ("K2 q_b_proj 12288x1536", 1, 12288, 1536),
        ("K2 kv_a_proj 576x7168", 1, 576, 7168),
        ("K2 o_proj 7168x8192", 1, 7168, 8192),
    ]
    return squares + k2


def bench_ns(cfg):
    dtype = torch.float32 if cfg["smoke"] else torch.bfloat16
    rows = []
    for label, batch, n, m in ns_shapes(cfg["smoke"]):
        G = torch.randn(batch, n, m, device=cfg["device"], dtype=dtype)
        row = {"shape": label, "batch": batch, "n": n, "m": m}
        variants = [("torch", "keller", "torch"), ("triton", "keller", "triton"), ("gram", "gram", "torch")]
        for name, method, backend in variants:
            try:
                row[f"{name}_ms"] = timer(
                    lambda: newton_schulz(G, steps=5, method=method, dtype=dtype, backend=backend), **cfg["t"]
                )
            except Exception as e:  # keep the other variants
                row[f"{name}_ms"] = None
                row[f"{name}_error"] = repr(e)[:200]
        if row.get("torch_ms") and row.get("triton_ms"):
            row["triton_speedup"] = row["torch_ms"] / row["triton_ms"]
        if row.get("torch_ms") and row.get("gram_ms"):
            row["gram_speedup"] = row["torch_ms"] / row["gram_ms"]
        rows.append(row)
        del G
    return rows


# ---------------------------------------------------------------------------------------------
# Grouped expert MLP (SwiGLU): gate/up/down, forward + backward


def grouped_shape(smoke: bool):
    if smoke:
        return {"experts": 4, "hidden": 32, "moe_width": 16, "tokens": 24, "top_k": 2}
    # k2_mini-ish: 64 experts, hidden 2048, moe width 768, 16k tokens routed top-8.
    return {"experts": 64, "hidden": 2048, "moe_width": 768, "tokens": 16384, "top_k": 8}


def bench_grouped_mlp(cfg):
    s = grouped_shape(cfg["smoke"])
    E, H, I = s["experts"], s["hidden"], s["moe_width"]
    T = s["tokens"] * s["top_k"]
    dev, dtype = cfg["device"], (torch.float32 if cfg["smoke"] else torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    counts_E = torch.multinomial(torch.ones(E), T, replacement=True, generator=g).bincount(minlength=E)
    offs_E = counts_E.cumsum(0).to(torch.int32).to(dev)
    x = torch.randn(T, H, device=dev, dtype=dtype, requires_grad=True)
    w_gate, w_up = [(torch.randn(E, I, H, device=dev, dtype=dtype) * H**-0.5).requires_grad_() for _ in range(2)]
    w_down = (torch.randn(E, H, I, device=dev, dtype=dtype) * I**-0.5).requires_grad_()
    dy = torch.randn(T, H, device=dev, dtype=dtype)

    def mlp(backend):
        gate = grouped_gemm(x, w_gate.transpose(1, 2), offs_E, backend=backend)
        up = grouped_gemm(x, w_up.transpose(1, 2), offs_E, backend=backend)
        return grouped_gemm(F.silu(gate) * up, w_down.transpose(1, 2), offs_E, backend=backend)

    def fwd_bwd(backend):
        torch.autograd.backward(mlp(backend), dy)

    def fwd(backend):
        with torch.no_grad():
            mlp(backend)

    result = dict(s, rows=T, min_tokens_per_expert=int(counts_E.min()), max_tokens_per_expert=int(counts_E.max()))
    for backend, label in (("loop", "loop"), ("torch", "grouped_mm"), ("triton", "triton"), ("auto", "auto")):
        for mode, fn in (("fwd_bwd", fwd_bwd), ("fwd", fwd)):
            try:
                result[f"{label}_{mode}_ms"] = timer(lambda: fn(backend), **cfg["t"])
            except Exception as e:
                result[f"{label}_{mode}_ms"] = None
                result[f"{label}_error"] = repr(e)[:200]
            x.grad = w_gate.grad = w_up.grad = w_down.grad = None
    h_TI = torch.empty(T, I, device=dev, dtype=dtype)  # the down projection's input
    result["auto_picks"] = {"gate_up": grouped_gemm_backend(x, w_gate.transpose(1, 2), offs_E),
                            "down": grouped_gemm_backend(h_TI, w_down.transpose(1, 2), offs_E)}
    tri, loop, gmm = (result.get(f"{k}_fwd_bwd_ms") for k in ("triton", "loop", "grouped_mm"))
    if tri:
        result["triton_vs_loop"] = loop / tri if loop else None
        result["triton_vs_grouped_mm"] = gmm / tri if gmm else None
    return result


# ---------------------------------------------------------------------------------------------
# Per-head max logit vs the chunked PyTorch path and the SDPA forward it accompanies


def max_logit_shapes(smoke: bool):
    """(seq, heads, qk_dim, v_dim); MLA: q.k over 128 nope + 64 rope, v 128."""
    if smoke:
        return [(40, 2, 192, 128)]
    return [(T, H, 192, 128) for T in (1024, 2048, 4096, 8192) for H in (16, 64)]


def _sdpa_forward(q, k, v):
    """Flash SDPA forward (v zero-padded to the q.k head dim, as flash needs equal dims)."""
    if q.shape[-1] != v.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_max_logits(cfg):
    dev, dtype = cfg["device"], (torch.float32 if cfg["smoke"] else torch.bfloat16)
    rows = []
    for T, H, D, Dv in max_logit_shapes(cfg["smoke"]):
        q = torch.randn(1, H, T, D, device=dev, dtype=dtype)
        k = torch.randn(1, H, T, D, device=dev, dtype=dtype)
        v = torch.randn(1, H, T, Dv, device=dev, dtype=dtype)
        scale = D**-0.5
        row = {"seq": T, "heads": H, "qk_dim": D, "v_dim": Dv}
        variants = (
            ("triton", lambda: max_logits_triton(q, k, scale)),
            ("chunked_torch", lambda: per_head_max_logits(q, k, scale, chunk_size=1024, backend="torch")),
            ("sdpa_fwd", lambda: _sdpa_forward(q, k, v)),
        )
        for name, fn in variants:
            try:
                with torch.no_grad():
                    row[f"{name}_ms"] = timer(fn, **cfg["t"])
            except Exception as e:
                row[f"{name}_ms"] = None
                row[f"{name}_error"] = repr(e)[:200]
        if row.get("triton_ms") and row.get("sdpa_fwd_ms"):
            row["triton_fraction_of_sdpa"] = row["triton_ms"] / row["sdpa_fwd_ms"]
        if row.get("triton_ms") and row.get("chunked_torch_ms"):
            row["triton_vs_chunked"] = row["chunked_torch_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Acceptance and reporting


def acceptance(results, smoke: bool):
    checks = []

    def add(name, value, target, ok):
        verdict = None if value is None else bool(ok(value))
        checks.append({"check": name, "value": value, "target": target,
                       "pass": "n/a (smoke)" if smoke else verdict})

    ns = results.get("ns")
    square = 48 if smoke else 4096
    ns_row = next((r for r in ns if r["n"] == r["m"] == square), None) if isinstance(ns, list) else None
    add("NS Triton / torch speedup at 4096^2 bf16, 5 steps", ns_row and ns_row.get("triton_speedup"),
        f">= {NS_MIN_SPEEDUP}", lambda v: v >= NS_MIN_SPEEDUP)
    gm = results.get("grouped_mlp")
    gm = gm if isinstance(gm, dict) else {}
    add("grouped MLP fwd+bwd: Triton vs per-expert loop", gm.get("triton_vs_loop"),
        f">= {GROUPED_MIN_VS_LOOP}", lambda v: v >= GROUPED_MIN_VS_LOOP)
    add("grouped MLP fwd+bwd: Triton vs torch grouped_mm", gm.get("triton_vs_grouped_mm"),
        f">= {GROUPED_MIN_VS_GROUPED_MM}", lambda v: v >= GROUPED_MIN_VS_GROUPED_MM)
    ml = results.get("max_logits")
    ml_rows = [r for r in ml if r["seq"] == (40 if smoke else 4096)] if isinstance(ml, list) else []
    fractions = [r["triton_fraction_of_sdpa"] for r in ml_rows if r.get("triton_fraction_of_sdpa")]
    add("max-logit kernel time / flash SDPA fwd at seq 4096 (worst head count)", max(fractions) if fractions else None,
        f"<= {MAX_LOGIT_MAX_FRACTION}", lambda v: v <= MAX_LOGIT_MAX_FRACTION)
    return checks


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(results) -> str:
    out = [f"# GPU kernels: {results['device']} ({results['date']})", ""]
    if results.get("smoke"):
        out += ["**CPU smoke run through the Triton interpreter: the timings are meaningless.**", ""]
    tables = {
        "ns": ["shape", "torch_ms", "triton_ms", "gram_ms", "triton_speedup", "gram_speedup"],
        "grouped_mlp": ["rows", "loop_fwd_bwd_ms", "grouped_mm_fwd_bwd_ms", "triton_fwd_bwd_ms", "auto_fwd_bwd_ms",
                        "loop_fwd_ms", "grouped_mm_fwd_ms", "triton_fwd_ms", "auto_fwd_ms", "triton_vs_loop",
                        "triton_vs_grouped_mm", "auto_picks"],
        "max_logits": ["seq", "heads", "qk_dim", "triton_ms", "chunked_torch_ms", "sdpa_fwd_ms",
                       "triton_fraction_of_sdpa", "triton_vs_chunked"],
    }
    for name, cols in tables.items():
        if name not in results:
            continue
        out += [f"## {name}", ""]
        value = results[name]
        if isinstance(value, dict) and "error" in value:
            out += [f"FAILED: {value['error']}", ""]
            continue
        out += [markdown_table(value if isinstance(value, list) else [value], cols), ""]
        errors = {k: v for r in (value if isinstance(value, list) else [value]) for k, v in r.items()
                  if k.endswith("_error")}
        out += [f"- {k}: {v}" for k, v in errors.items()] + ([""] if errors else [])
    out += ["## acceptance", "", markdown_table(results["acceptance"], ["check", "value", "target", "pass"])]
    return "\n".join(out)


SECTIONS = {"ns": bench_ns, "grouped_mlp": bench_grouped_mlp, "max_logits": bench_max_logits}


def run_section(name, cfg):
    try:
        torch.manual_seed(0)
        return SECTIONS[name](cfg)
    except Exception as e:  # one broken section must not lose the others
        traceback.print_exc()
        return {"error": repr(e)[:500]}
    finally:
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()


def run_section_isolated(name, args):
    """The section in a fresh process: a CUDA fault poisons only that process's context."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "section.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--no-isolate", "--sections", name, "--out", out,
               "--warmup", str(args.warmup), "--reps", str(args.reps)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECTION_TIMEOUT_S[name])
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {SECTION_TIMEOUT_S[name]}s"}
        sys.stderr.write(proc.stderr[-3000:])
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"exit code {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        with open(out) as f:
            return json.load(f)[name]


def run(args) -> dict:
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs a CUDA device; use --cpu-smoke to check the script on CPU")
    device = "cpu" if smoke else "cuda"
    cfg = {"smoke": smoke, "device": device,
           "t": {"warmup": 0 if smoke else args.warmup, "reps": 1 if smoke else args.reps, "cuda": not smoke}}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results = {
        "device": "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton_version, "smoke": smoke,
    }
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    for name in wanted:
        t0 = time.perf_counter()
        if smoke or args.no_isolate:
            results[name] = run_section(name, cfg)
        else:
            results[name] = run_section_isolated(name, args)
        print(f"[{name}] {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    results["acceptance"] = acceptance(results, smoke)
    return results


def main(argv=None):
    args = ARGS if argv is None and ARGS is not None else parse_args(argv)
    results = run(args)
    print(report(results))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
