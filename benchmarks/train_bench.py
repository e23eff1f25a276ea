"""Training-step benchmark: our model vs transformers' DeepseekV3ForCausalLM, and MuonClip vs AdamW.

    python benchmarks/train_bench.py                       # CPU, 2 threads, the reference config
    python benchmarks/train_bench.py --quick               # smoke run (seconds)
    python benchmarks/train_bench.py --device cuda --batch 32 --seq 1024 --json out.json
    python benchmarks/train_bench.py --variants ours+adamw --loss-chunk-tokens 0,1024 --vocab 32768
                                                           # the chunked loss against the full logits
    python benchmarks/train_bench.py --model tiny --batch 8 --seq 128 --variants ours+muonclip \
        --activation-checkpointing none,selective,full     # recomputation's step time (issue 25)
    python benchmarks/train_bench.py --model k2_mini --scope moe-layer --batch 1 --seq 1024 \
        --variants ours+adamw --activation-checkpointing none,selective,full   # one k2_mini MoE layer

Variants, each in its own subprocess (so peak memory is per variant), same weights, same
batch, same loss (cross-entropy in fp32 over the logits; ours computes it as training does,
``model(x, labels=y)``, in chunks of model.loss_chunk_tokens tokens, 0: the full logits):

    ours+adamw      KimiForCausalLM + torch.optim.AdamW
    hf+adamw        transformers DeepseekV3ForCausalLM built from our export's config.json
                    (kimi_train.tools.hf.export) with the same weights + torch.optim.AdamW
    ours+muonclip   KimiForCausalLM + optim.MuonClip (Muon + AdamW groups + QK-Clip)

Sweeps: ``--loss-chunk-tokens 0,1024`` and ``--activation-checkpointing none,selective,full``
run each of our variants once per value (``ours+adamw chunk=0``, ``ours+adamw chunk=1024``; both
given: every combination) and report each value's step time relative to the first one's.
``--model NAME`` takes configs/model/NAME.yaml (with ``--layers``) instead of the reference
config below. ``--scope moe-layer`` times the forward and backward of the model's first MoE
decoder layer alone (no embedding, loss or optimizer): a layer's cost in isolation.

One step = forward, loss, backward, optimizer step, zero_grad. Reported: median step time
over --steps timed steps after --warmup (best of --rounds interleaved rounds), tokens/s = batch * seq / median, and peak memory
(CUDA: max allocated; CPU: the subprocess's peak resident set size). Our model records
its per-head max logits in every variant (as in training); the HF model does not.

Reference config (the issue's): hidden 256, 4 layers (first dense), 16 routed experts top-4
plus 1 shared, MLA kv_lora_rank 64, 4 heads (nope 32, rope 16, v 32), byte vocab 256
(``--vocab``), batch 8 x 256 tokens, fp32 on CPU (bf16 autocast on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("ours+adamw", "hf+adamw", "ours+muonclip")


# Settings of our model that a sweep varies: option -> the short name in a variant's label.
SWEEPS = {"loss_chunk_tokens": "chunk", "activation_checkpointing": "ac"}


def model_config(args):
    from kimi_train.model import ModelConfig, load_model_config

    chunk = {} if args.loss_chunk_tokens is None else {"loss_chunk_tokens": int(args.loss_chunk_tokens)}
    if args.model:
        return load_model_config(args.model, num_hidden_layers=args.layers, **chunk)
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers, num_attention_heads=4, n_routed_experts=args.experts, num_experts_per_tok=4,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=max(4096, args.seq), **chunk,
    ).validate()


def hf_model_from_export(export_dir, dtype, **hf_kwargs):
    """transformers' DeepseekV3ForCausalLM loaded from our export (kimi_train.tools.hf.export:
    its config.json and weights), so both sides hold the same weights. hf_kwargs go to
    from_pretrained (attn_implementation, experts_implementation, ...)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=dtype, **hf_kwargs)


def run_variant(args) -> dict:
    """Inside the subprocess: build one variant and time its training steps."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from kimi_train.model import KimiForCausalLM

    torch.manual_seed(0)
    ours = KimiForCausalLM(model_config(args))
    if args.activation_checkpointing:
        from kimi_train.parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(ours, args.activation_checkpointing)
    if args.scope == "moe-layer":
        return time_moe_layer(args, ours, device)
    if args.variant.startswith("hf"):
        from kimi_train.tools.hf import export  # transformers: only the variant that needs it

        with tempfile.TemporaryDirectory() as d:
            model = hf_model_from_export(export(ours, d), dtype=torch.float32)
        del ours

        def forward_loss(x, y):
            return F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())
    else:
        model = ours
        forward_loss = lambda x, y: model(x, labels=y)  # noqa: E731
    model.to(device).train()
    if "muonclip" in args.variant:
        from optim import MuonClip, muon_param_groups

        ns_dtype = torch.bfloat16 if args.ns_dtype == "bf16" else torch.float32
        opt = MuonClip(muon_param_groups(model), attention_layers=model.attention_layers(), tau=100.0, lr=1e-3,
                       ns_dtype=ns_dtype)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        with amp:
            loss = forward_loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    median = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"variant": args.variant,
            "loss_chunk_tokens": model.config.loss_chunk_tokens if args.variant.startswith("ours") else None,
            "activation_checkpointing": args.activation_checkpointing if args.variant.startswith("ours") else None,
            "step_ms": 1000 * median, "tokens_per_s": args.batch * args.seq / median,
            "peak_mem_mb": peak_mb, "first_loss": losses[0], "last_loss": losses[-1],
            "num_params": sum(p.numel() for p in model.parameters())}


def time_moe_layer(args, model, device) -> dict:
    """Forward + backward of the first MoE decoder layer on a [batch, seq, D] input (statistics on)."""
    import torch

    from kimi_train.model.moe import MoE

    layer = next(layer for layer in model.model.layers if isinstance(layer.mlp, MoE)).to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, model.config.hidden_size, generator=g).to(device).requires_grad_()
    dy = torch.randn(args.batch, args.seq, model.config.hidden_size, generator=g).to(device)
    cos, sin = model.model.rotary_emb(torch.arange(args.seq, device=device), x.dtype)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        (layer(x, cos, sin) * dy).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        layer.self_attn.reset_max_logits()
        layer.mlp.reset_counts()
    median = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "activation_checkpointing": args.activation_checkpointing,
            "step_ms": 1000 * median, "tokens_per_s": args.batch * args.seq / median, "peak_mem_mb": peak_mb,
            "num_params": sum(p.numel() for p in layer.parameters())}


def _sweep_runs(args) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """name -> the subprocess's arguments: each of our variants once per combination of swept
    values (transformers' once, unswept); and the values per option (the first: the ratios' reference)."""
    sweeps = {o: getattr(args, o).split(",") for o in SWEEPS if getattr(args, o) is not None}
    runs: dict[str, list[str]] = {}
    for variant in args.variants.split(","):
        combos: list[list[tuple[str, str]]] = [[]]
        if variant.startswith("ours"):
            for option, values in sweeps.items():
                combos = [[*c, (option, v)] for c in combos for v in values]
        for combo in combos:
            label = "".join(f" {SWEEPS[o]}={v}" for o, v in combo if len(sweeps[o]) > 1)
            runs[variant + label] = ["--variant", variant, *[f"--{o.replace('_', '-')}={v}" for o, v in combo]]
    return runs, sweeps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--loss-chunk-tokens", dest="loss_chunk_tokens", default=None,
                   help="model.loss_chunk_tokens for our variants (default: ModelConfig's); a comma list runs each")
    p.add_argument("--activation-checkpointing", dest="activation_checkpointing", default=None,
                   help="train.activation_checkpointing for our variants (none | selective | full); a comma list runs each")
    p.add_argument("--model", default=None, help="configs/model/NAME.yaml (with --layers) instead of the reference config")
    p.add_argument("--scope", default="step", choices=("step", "moe-layer"),
                   help="step: the whole training step; moe-layer: one MoE decoder layer's forward and backward")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ns-dtype", dest="ns_dtype", default="bf16", choices=("bf16", "fp32"),
                   help="MuonClip's Newton-Schulz dtype (kimi-train's default: bf16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median per variant is kept")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: checks that everything runs")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.experts, args.batch, args.seq, args.warmup, args.steps = 64, 2, 4, 2, 32, 1, 2
        args.rounds = 1
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    if args.model and args.layers == 4 and "--layers" not in " ".join(sys.argv):
        args.layers = 2  # a named model: its dense first layer and one MoE layer unless --layers says otherwise
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("device", "threads", "hidden", "layers", "experts", "batch",
                                                        "seq", "vocab", "warmup", "steps", "scope")]
    passthrough += [f"--ns-dtype={args.ns_dtype}"] + ([f"--model={args.model}"] if args.model else [])
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    if args.scope == "moe-layer" and args.variants != "ours+adamw":
        sys.exit("--scope moe-layer times our layer alone: use --variants ours+adamw")
    runs, sweeps = _sweep_runs(args)
    variants = list(runs)
    # Rounds interleave the variants (A B C A B C ...) and keep each one's best median, so a
    # burst of load from other processes does not land on one variant only.
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in variants:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, *runs[variant]],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            r = {**json.loads(proc.stdout.strip().splitlines()[-1]), "variant": variant}
            if variant not in best or r["step_ms"] < best[variant]["step_ms"]:
                r["peak_mem_mb"] = max(r["peak_mem_mb"], best.get(variant, {}).get("peak_mem_mb", 0.0))
                best[variant] = r
    results = [best[v] for v in variants]

    by = {r["variant"]: r for r in results}
    ratios = {}
    if "ours+adamw" in by and "hf+adamw" in by:
        ratios["ours_vs_hf_tokens_per_s"] = by["ours+adamw"]["tokens_per_s"] / by["hf+adamw"]["tokens_per_s"]
    if "ours+adamw" in by and "ours+muonclip" in by:
        ratios["muonclip_vs_adamw_step_time"] = by["ours+muonclip"]["step_ms"] / by["ours+adamw"]["step_ms"]
    for name in variants:  # each swept value against the option's first value, the rest of the label equal
        for option, values in sweeps.items():
            short = f" {SWEEPS[option]}="
            here = next((part for part in name.split(" ") if part.startswith(short[1:])), None)
            if here is None or here == short[1:] + values[0]:
                continue
            base = name.replace(here, short[1:] + values[0])
            ratios[f"{name} vs {short[1:]}{values[0]} step_time"] = by[name]["step_ms"] / by[base]["step_ms"]
    report = {
        "config": {k: getattr(args, k) for k in ("device", "threads", "hidden", "layers", "experts", "batch", "seq",
                                                  "vocab", "warmup", "steps", "rounds", "ns_dtype",
                                                  "loss_chunk_tokens", "activation_checkpointing", "model",
                                                  "scope")},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
        "results": results,
        "ratios": ratios,
    }
    print(f"| variant | step ms | tokens/s | peak mem MB | params |\n|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} | "
              f"{r['num_params'] / 1e6:.2f}M |")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
