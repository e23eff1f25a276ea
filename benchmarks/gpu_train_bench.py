"""Training throughput and MFU of the whole step on one GPU: ours vs transformers' DeepseekV3.

One command on one H200 (at most 5 minutes; every section has a time limit):

    python benchmarks/gpu_train_bench.py                    # JSON: docs/results/gpu/train_bench_h200_<date>.json
    python benchmarks/gpu_train_bench.py --cpu-smoke --out /tmp/smoke.json   # tiny shapes on CPU (CI)

Sections, each in its own subprocess with a wall-clock limit (a CUDA fault or a hang costs only
that section; variants left when the limit nears are recorded as skipped):

    matmul       bf16 8192^3 matrix products: the rate this GPU reaches in this run
    k2_mini      model=k2_mini (1.05B total, 130M active) at seq 4096, ~0.5M tokens per step
    compile      the same with ours+muonclip+compile (apart: its first compile has its own limit)
    dense        the same shape with every layer dense (first_k_dense_replace = num_hidden_layers)
    small_batch  k2_mini, one 4096-token sequence per step (where the optimizer's share is largest)

Variants (the models hold the same weights: transformers' is loaded from our export):

    ours+adamw              KimiForCausalLM + AdamW (the trainer's build_optimizer)
    ours+muonclip           + MuonClip (Muon, QK-Clip, max-logit capture in every forward)
    ours+muon-nocapture     + Muon, capture off: what capture + clip cost, by difference
    ours+muonclip+compile   ours+muonclip with model.compile(), as train.compile=true does
    hf+adamw                DeepseekV3ForCausalLM (SDPA, experts_implementation="grouped_mm") + AdamW
    ours+adamw/bf16, hf+adamw/bf16   the same in pure bf16 (bf16 parameters and AdamW state)

Dtype policies: the plain variants are the trainer's single-GPU policy, fp32 parameters (the
optimizer's master weights) under bf16 autocast, for both models; transformers' grouped_mm
experts then cast their inputs up to the fp32 weights (its code, not ours), so its experts
run fp32 GEMMs. The /bf16 variants pin both models to bf16 parameters and bf16 compute, which
is transformers' fastest setting. Loss: cross-entropy in fp32 over the logits; ours as the trainer
computes it, ``model(x, labels=y)`` (over chunks of model.loss_chunk_tokens tokens when > 0).

One step = A micro-batches of forward + backward (gradient accumulation), the global gradient
norm, the optimizer step (MuonClip: then QK-Clip), the expert-bias update, zero_grad. Reported
per variant: step_ms (wall clock of the step), tokens_per_s, mfu (model FLOPs per token from
kimi_train.loop.metrics.flops_per_token x tokens/s over 989 TFLOP/s, and over the matmul rate
measured in this run), peak_mem_gib (CUDA max allocated, model and optimizer state included),
and a breakdown in ms: forward (includes the capture), backward, grad_norm, optimizer (Muon or
AdamW, the clip excluded), max_logit_capture (every per-head max in every forward), clip
(QK-Clip: max-logit reduction, check, rescale), other (expert-bias update, zero_grad, gaps).
Timed with CUDA events; the first (warm-up) step runs two micro-batches, so compilation and
autotuning stay out of the timed steps. The compiled variant reports no capture time (the
timing hooks would break its graph); its capture is inside its forward.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASHEET_BF16_FLOPS = 989e12  # H100/H200 dense bf16, as kimi_train.loop.metrics.PEAK_FLOPS_BF16

# name: (model, optimizer, capture, compile, parameter dtype)
VARIANTS = {
    "ours+adamw": ("ours", "adamw", True, False, "fp32"),
    "ours+muonclip": ("ours", "muonclip", True, False, "fp32"),
    "ours+muon-nocapture": ("ours", "muon", False, False, "fp32"),
    "hf+adamw": ("hf", "adamw", False, False, "fp32"),
    "ours+adamw/bf16": ("ours", "adamw", True, False, "bf16"),
    "hf+adamw/bf16": ("hf", "adamw", False, False, "bf16"),
    "ours+muonclip+compile": ("ours", "muonclip", True, True, "fp32"),
}
# Most important first: a section that runs out of time loses the last ones.
SECTIONS = {
    "matmul": {"timeout_s": 15},
    "k2_mini": {"timeout_s": 115, "dense": False, "tokens_per_step": 524288, "steps": 1,
                # hf+adamw last: fp32 weights make torch's grouped_mm a per-expert loop (the slowest here)
                "variants": ["ours+adamw", "ours+muonclip", "hf+adamw/bf16", "ours+adamw/bf16", "ours+muon-nocapture",
                             "hf+adamw"]},
    # Its own limit: inductor's first compile of k2_mini is the least predictable cost here.
    "compile": {"timeout_s": 80, "dense": False, "tokens_per_step": 524288, "steps": 1,
                "variants": ["ours+muonclip+compile"]},
    "dense": {"timeout_s": 50, "dense": True, "tokens_per_step": 524288, "steps": 1,
              "variants": ["ours+adamw", "ours+muonclip", "hf+adamw"]},
    "small_batch": {"timeout_s": 30, "dense": False, "tokens_per_step": 4096, "steps": 5,
                    "variants": ["ours+adamw", "ours+muonclip", "ours+muon-nocapture"]},
}
# --cpu-smoke: every variant once on the MoE shape; the other sections only differ in shape.
SMOKE_VARIANTS = {"dense": ["hf+adamw"], "small_batch": ["ours+muonclip"]}
BUDGET_S = 290  # the whole run: the section limits plus the driver's own start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "gpu" / f"train_bench_h200_{date}.json"))
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (the rest is accumulation)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the +compile variant (default: inductor; --cpu-smoke: eager, "
                        "dynamo's tracing and guards without code generation: inductor on CPU is "
                        "tests/train/test_trainer.py's compile test, and here it would cost CI half a minute)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script, times nothing")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Models, optimizers, timing


def model_config(dense: bool, smoke: bool):
    from kimi_train.model import load_model_config

    kw = {}
    if smoke:  # k2_mini's structure (MLA dims halved, 2-of-8 experts, dense first layer) at toy width
        kw = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, n_routed_experts=8, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, vocab_size=256, max_logits_chunk=16)
    cfg = load_model_config("k2_mini", **kw)
    if dense:
        cfg = load_model_config("k2_mini", **kw, first_k_dense_replace=cfg.num_hidden_layers)
    return cfg


def build_optimizer(name: str, model):
    """The trainer's own optimizer construction (kimi_train.parallel.optimizer.build_optimizer), defaults."""
    from kimi_train.config import OptimConfig, TrainConfig
    from kimi_train.parallel.optimizer import build_optimizer as trainer_build_optimizer

    return trainer_build_optimizer(TrainConfig(optim=OptimConfig(name=name)), model, check_finite=False)


class Phases:
    """Time named phases of a step: CUDA events on a GPU (read after one sync), else perf_counter."""

    def __init__(self, cuda: bool):
        self.cuda, self.spans = cuda, []

    def start(self, name: str):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return name, ev
        return name, time.perf_counter()

    def stop(self, token) -> None:
        name, begin = token
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((name, begin, end))
        else:
            self.spans.append((name, begin, time.perf_counter()))

    def totals_ms(self) -> dict:
        out: dict = {}
        for name, begin, end in self.spans:
            ms = begin.elapsed_time(end) if self.cuda else 1000 * (end - begin)
            out[name] = out.get(name, 0.0) + ms
        self.spans = []
        return out


def instrument(model, opt, phases: Phases, capture_hooks: bool) -> None:
    """Wrap the max-logit capture of every attention layer and QK-Clip's parts in timing spans."""
    from optim import MuonClip

    def timed(fn, name):
        def wrapper(*args, **kwargs):
            token = phases.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                phases.stop(token)
        return wrapper

    if capture_hooks:
        for layer in model.attention_layers():
            layer._record = timed(layer._record, "max_logit_capture")
    if isinstance(opt, MuonClip):
        for part in ("prepare_qk_clip", "_apply_decision", "finish_qk_clip"):  # QK-Clip: decide, apply, reset
            setattr(opt, part, timed(getattr(opt, part), "clip"))


def train_step(model, forward, opt, micro_batches, device, phases: Phases, ours: bool) -> float:
    """One optimizer step as kimi_train.loop.trainer.Trainer.train_step takes it; its mean loss."""
    import torch

    from kimi_train.model import update_expert_bias
    from kimi_train.parallel import clip_grad_norm_

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum = torch.zeros((), device=device)
    for batch in micro_batches:
        x, y = batch[:, :-1], batch[:, 1:]
        token = phases.start("forward")
        with amp:
            loss = forward(x, y)  # ours: model(x, labels=y), the trainer's chunked loss
        phases.stop(token)
        token = phases.start("backward")
        (loss / len(micro_batches)).backward()
        phases.stop(token)
        loss_sum += loss.detach()
    token = phases.start("grad_norm")
    float(clip_grad_norm_(model.parameters(), 1.0))  # read on the host, as the trainer's skip check does
    phases.stop(token)
    token = phases.start("optimizer")
    opt.step()
    phases.stop(token)
    opt.zero_grad(set_to_none=True)
    if ours:
        update_expert_bias(model.moe_layers())
    return float(loss_sum) / len(micro_batches)


# ---------------------------------------------------------------------------------------------
# Sections


def bench_matmul(args, deadline):
    import torch

    if args.cpu_smoke:
        n, dtype, reps = 256, torch.float32, 2
    else:
        n, dtype, reps = 8192, torch.bfloat16, 10
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(args.device)
    dt = (time.perf_counter() - t0) / reps
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": 1000 * dt, "flops_per_s": 2 * n**3 / dt}


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_training(name, args, deadline, progress=None):
    """Every variant of a section on one model shape, until the section's deadline nears;
    progress(result) after each variant (so a section killed at its limit keeps what it did)."""
    import torch

    from kimi_train.loop.metrics import flops_per_token
    from kimi_train.model import KimiForCausalLM

    spec = SECTIONS[name]
    device = torch.device(args.device)
    cfg = model_config(spec["dense"], args.cpu_smoke)
    seq = 32 if args.cpu_smoke else args.seq
    micro = min(2 if args.cpu_smoke else args.micro_batch, max(1, spec["tokens_per_step"] // args.seq))
    accum = max(1, spec["tokens_per_step"] // (args.seq * micro))
    if args.cpu_smoke:
        accum = min(accum, 2)
    torch.manual_seed(0)
    ours_cpu = KimiForCausalLM(cfg)  # every variant starts from these weights
    result = {"model": "k2_mini" + (" all-dense" if spec["dense"] else ""), "seq": seq, "micro_batch": micro,
              "accumulation": accum, "tokens_per_step": micro * accum * seq,
              "num_params": sum(p.numel() for p in ours_cpu.parameters()),
              "flops_per_token": flops_per_token(ours_cpu, cfg, seq), "variants": []}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g).to(device) for _ in range(accum)]
    export_dir = tempfile.TemporaryDirectory()
    exported = None
    for variant in SMOKE_VARIANTS.get(name, spec["variants"]) if args.cpu_smoke else spec["variants"]:
        left = deadline - time.time()
        if left < (10 if args.cpu_smoke else 25):
            result["variants"].append({"variant": variant, "skipped": f"section time limit ({left:.0f}s left)"})
            continue
        if VARIANTS[variant][0] == "hf" and exported is None:
            from kimi_train.tools.hf import export

            exported = export(ours_cpu, export_dir.name)
        t0 = time.time()
        try:
            steps = 1 if args.cpu_smoke else spec["steps"]
            row = run_variant(variant, ours_cpu, exported, batches, steps, args, device, deadline)
        except Exception as e:  # one broken variant must not lose the others
            traceback.print_exc()
            row = {"variant": variant, "error": repr(e)[:500]}
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()
        row["wall_s"] = time.time() - t0  # build, warm-up (compile) and timed steps
        result["variants"].append(row)
        print(f"[{name}] {json.dumps(row)}", file=sys.stderr, flush=True)
        if progress is not None:
            progress(result)
    export_dir.cleanup()
    return result


def run_variant(variant, ours_cpu, exported, batches, steps, args, device, deadline) -> dict:
    import torch
    import torch.nn.functional as F

    impl, optim_name, capture, compiled, pdtype = VARIANTS[variant]
    if compiled and args.cpu_smoke:
        # In fp32 the CPU grouped GEMM is the per-expert loop (grouped_mm compiles in bf16 only), whose
        # host read breaks the graph in every MoE layer: tracing that CPU-only path would be most of
        # the smoke's time. bf16 parameters take grouped_mm, as the GPU does under autocast.
        pdtype = "bf16"
    dtype = torch.bfloat16 if pdtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row: dict = {"variant": variant, "param_dtype": pdtype,
                 "compute_dtype": "bf16" if device.type == "cuda" else "fp32"}
    if impl == "hf":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_bench import hf_model_from_export

        kwargs = {"attn_implementation": "sdpa", "experts_implementation": "grouped_mm"}
        try:
            model = hf_model_from_export(exported, dtype, **kwargs)
        except (TypeError, ValueError) as e:  # a transformers without experts_implementation
            row["experts_implementation_error"] = repr(e)[:200]
            kwargs.pop("experts_implementation")
            model = hf_model_from_export(exported, dtype, **kwargs)
        row["hf_settings"] = kwargs
        row["hf_experts_implementation"] = getattr(model.config, "_experts_implementation", None)  # as applied
        row["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        if pdtype == "fp32" and device.type == "cuda":
            row["note"] = "transformers' grouped_mm experts cast their inputs to the fp32 weights: fp32 expert GEMMs"
        model.to(device).train()
        forward = lambda x, y: F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())  # noqa: E731
    else:
        model = copy.deepcopy(ours_cpu).to(device=device, dtype=dtype).train()
        model.set_record_max_logits(capture)
        forward = lambda x, y: model(x, labels=y)  # noqa: E731
        if compiled:
            model.compile(backend=args.compile_backend)
    opt = build_optimizer(optim_name, model)
    phases = Phases(device.type == "cuda")
    instrument(model if impl == "ours" else None, opt, phases, capture_hooks=impl == "ours" and capture and not compiled)

    # Warm-up: compilation, autotuning. Two micro-batches: the second one meets the max-logit records
    # the first one left (a compiled forward guards on them: one more graph).
    train_step(model, forward, opt, batches[:2], device, phases, impl == "ours")
    sync(device)
    phases.totals_ms()
    walls, parts, losses = [], {}, []
    for _ in range(steps):
        if time.time() > deadline - 5:
            break
        sync(device)
        t0 = time.perf_counter()
        losses.append(train_step(model, forward, opt, batches, device, phases, impl == "ours"))
        sync(device)
        walls.append(1000 * (time.perf_counter() - t0))
        for k, v in phases.totals_ms().items():
            parts[k] = parts.get(k, 0.0) + v
    if not walls:
        return {**row, "skipped": "section time limit (after the warm-up step)"}
    n = len(walls)
    step_ms = sum(walls) / n
    breakdown = {k: v / n for k, v in parts.items()}
    breakdown["optimizer"] = breakdown.get("optimizer", 0.0) - breakdown.get("clip", 0.0)
    breakdown.setdefault("max_logit_capture", None if compiled or not capture or impl == "hf" else 0.0)
    breakdown.setdefault("clip", 0.0)
    known = sum(v for k, v in breakdown.items() if v is not None and k != "max_logit_capture")  # capture is inside forward
    breakdown["other"] = step_ms - known
    tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    row.update(steps=n, step_ms=step_ms, tokens_per_s=tokens / (step_ms / 1000), breakdown_ms=breakdown,
               loss=losses[-1],
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
    del model, opt
    return row


def run_section(name, args, deadline, progress=None):
    if name == "matmul":
        return bench_matmul(args, deadline)
    return bench_training(name, args, deadline, progress)


def write_json(path, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Driver and report


def run_isolated(name, args, timeout_s):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "section.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--out", out, "--seq", str(args.seq),
               "--micro-batch", str(args.micro_batch), "--compile-backend", args.compile_backend,
               "--deadline", str(time.time() + timeout_s - 10)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            failure = None if proc.returncode == 0 else f"exit code {proc.returncode}: {proc.stderr.strip()[-500:]}"
            sys.stderr.write(proc.stderr[-4000:])
        except subprocess.TimeoutExpired:
            failure = f"killed at its {timeout_s}s limit"
        if not os.path.exists(out):  # the section writes after every variant: keep what it finished
            return {"error": failure or "no output"}
        with open(out) as f:
            result = json.load(f)
        if failure:
            result["error_after_partial_results"] = failure
        return result


def add_mfu(results) -> None:
    rate = (results.get("matmul") or {}).get("flops_per_s")
    for name in SECTIONS:
        section = results.get(name)
        if not isinstance(section, dict) or "variants" not in section:
            continue
        for row in section["variants"]:
            if "tokens_per_s" not in row:
                continue
            achieved = row["tokens_per_s"] * section["flops_per_token"]
            row["model_tflops_per_s"] = achieved / 1e12
            row["mfu"] = achieved / DATASHEET_BF16_FLOPS
            row["mfu_vs_measured_matmul"] = achieved / rate if rate else None


def ratios(results) -> dict:
    out = {}
    for name in ("k2_mini", "dense", "small_batch"):
        section = results.get(name)
        if not isinstance(section, dict) or "variants" not in section:
            continue
        rows = section["variants"] + (results.get("compile") or {}).get("variants", []) * (name == "k2_mini")
        by = {r["variant"]: r for r in rows if "step_ms" in r}

        def ratio(key, a, b, field="step_ms"):
            if a in by and b in by:
                out[f"{name}: {key}"] = by[a][field] / by[b][field]

        ratio("muonclip step / adamw step", "ours+muonclip", "ours+adamw")
        ratio("capture + clip share of the muonclip step", "ours+muonclip", "ours+muon-nocapture")
        ratio("ours/hf tokens/s (fp32 params + bf16 autocast)", "ours+adamw", "hf+adamw", "tokens_per_s")
        ratio("ours/hf tokens/s (bf16 params)", "ours+adamw/bf16", "hf+adamw/bf16", "tokens_per_s")
        ratio("ours compiled (muonclip) / hf best tokens/s", "ours+muonclip+compile", "hf+adamw/bf16", "tokens_per_s")
        ratio("ours compiled (muonclip) / hf same policy tokens/s", "ours+muonclip+compile", "hf+adamw", "tokens_per_s")
        key = f"{name}: capture + clip share of the muonclip step"
        if key in out:
            out[key] = 1 - 1 / out[key]
    return out


def report(results) -> str:
    lines = [f"# Training step on {results['device']} ({results['date']})", ""]
    if results["smoke"]:
        lines += ["**CPU smoke run: the timings mean nothing.**", ""]
    mm = results.get("matmul") or {}
    if "flops_per_s" in mm:
        lines += [f"matmul {mm['n']}^3 {mm['dtype']}: {mm['flops_per_s'] / 1e12:.0f} TFLOP/s", ""]
    cols = ["forward", "backward", "grad_norm", "optimizer", "max_logit_capture", "clip", "other"]
    for name in ("k2_mini", "compile", "dense", "small_batch"):
        section = results.get(name)
        if section is None:
            continue
        if "variants" not in section:
            lines += [f"## {name}: FAILED: {section.get('error')}", ""]
            continue
        lines += [f"## {name}: {section['model']}, seq {section['seq']}, {section['tokens_per_step']} tokens per step "
                  f"({section['micro_batch']} x {section['accumulation']} micro-batches)", "",
                  "| variant | step ms | tokens/s | MFU (989) | MFU (matmul) | peak GiB | " + " | ".join(cols) + " |",
                  "|---|" + "---:|" * (5 + len(cols))]
        for r in section["variants"]:
            if "step_ms" not in r:
                lines.append(f"| {r['variant']} | {r.get('skipped') or r.get('error')} |")
                continue
            f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
            b = r["breakdown_ms"]
            lines.append(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {f(r.get('mfu'), '{:.1%}')} | "
                         f"{f(r.get('mfu_vs_measured_matmul'), '{:.1%}')} | {f(r['peak_mem_gib'])} | "
                         + " | ".join(f(b.get(c)) for c in cols) + " |")
        lines.append("")
    lines += ["## ratios", ""] + [f"- {k}: {v:.3f}" for k, v in results["ratios"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_train_bench.py needs a CUDA device; --cpu-smoke checks the script on CPU")
    args.device = "cpu" if args.cpu_smoke else "cuda"
    args.compile_backend = args.compile_backend or ("eager" if args.cpu_smoke else "inductor")
    if args.cpu_smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.section:  # inside a section's subprocess
        write_json(args.out, run_section(args.section, args, args.deadline, lambda r: write_json(args.out, r)))
        return
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        sys.exit(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    import transformers

    results = {"device": "cpu" if args.cpu_smoke else torch.cuda.get_device_name(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "torch": torch.__version__, "transformers": transformers.__version__, "smoke": args.cpu_smoke,
               "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
               "datasheet_bf16_flops": DATASHEET_BF16_FLOPS}
    start = time.time()
    for name in wanted:
        timeout_s = SECTIONS[name]["timeout_s"]
        if args.cpu_smoke:
            timeout_s *= 2  # a loaded CI machine; the smoke shapes take seconds
        elif time.time() - start + timeout_s > BUDGET_S:
            results[name] = {"error": f"skipped: the {BUDGET_S}s budget would be exceeded"}
            continue
        t0 = time.time()
        if args.cpu_smoke:  # in this process: CI time goes to the code, not to importing it per section
            results[name] = run_section(name, args, t0 + timeout_s)
        else:
            results[name] = run_isolated(name, args, timeout_s)
        print(f"[{name}] {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
        save(results, args.out, start)
    save(results, args.out, start)
    print(report(results))
    print(f"\nwrote {args.out}", file=sys.stderr)


def save(results, out, start) -> None:
    """The JSON so far, MFU and ratios included: written after every section, so a run stopped
    from outside keeps the sections it finished."""
    results["elapsed_s"] = time.time() - start
    add_mfu(results)
    results["ratios"] = ratios(results)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, results)


if __name__ == "__main__":
    main()
