"""Overhead of exact per-head max-logit capture relative to the attention forward (SDPA).

    python benchmarks/max_logit_bench.py                         # CPU, T = 256..2048
    python benchmarks/max_logit_bench.py --device cuda --seq 1024,4096,8192 --out results.json

For each sequence length: median wall time of SDPA (causal, MLA head dims: q/k 192 =
128 nope + 64 rope, v 128 padded to 192 as the model does), of per_head_max_logits with
the chunked PyTorch path (and the Triton kernel on CUDA), and the ratio capture / SDPA.
Prints a table and writes JSON (--out). The capture runs only in training forwards; the
attention backward (about 2x the forward) is not in the denominator, so the overhead on a
whole training step is smaller than the ratio shown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kimi_train.model.max_logits import per_head_max_logits


def _median_ms(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (and Triton compile)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(seqs: list[int], batch: int, heads: int, chunk: int, reps: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for T in seqs:
        q = torch.randn(batch, heads, T, 192, device=device, dtype=dtype, generator=g)
        k = torch.randn(batch, heads, T, 192, device=device, dtype=dtype, generator=g)
        v = torch.randn(batch, heads, T, 192, device=device, dtype=dtype, generator=g)
        scale = 192**-0.5
        with torch.no_grad():
            row = {"seq": T, "batch": batch, "heads": heads, "dtype": str(dtype).removeprefix("torch."),
                   "device": device.type, "chunk": chunk}  # fmt: skip
            row["sdpa_ms"] = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), device, reps)
            row["capture_torch_ms"] = _median_ms(
                lambda: per_head_max_logits(q, k, scale, chunk_size=chunk, backend="torch"), device, reps
            )
            row["overhead_torch"] = row["capture_torch_ms"] / row["sdpa_ms"]
            if device.type == "cuda":
                try:
                    row["capture_triton_ms"] = _median_ms(lambda: per_head_max_logits(q, k, scale, backend="triton"), device, reps)
                    row["overhead_triton"] = row["capture_triton_ms"] / row["sdpa_ms"]
                except ValueError as e:  # kernel not importable
                    row["triton_error"] = str(e)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", default="256,512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--chunk", type=int, default=128, help="query chunk of the PyTorch path (model default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = run([int(s) for s in a.seq.split(",")], a.batch, a.heads, a.chunk, a.reps, device, dtype)

    cols = ["seq", "sdpa_ms", "capture_torch_ms", "overhead_torch"]
    if any("capture_triton_ms" in r for r in rows):
        cols += ["capture_triton_ms", "overhead_triton"]
    print(f"max-logit capture vs SDPA forward: B={a.batch} H={a.heads} D=192 {rows[0]['dtype']} on {device.type}, "
          f"{torch.get_num_threads()} threads")
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, float('nan')):>17.3f}" if c != "seq" else f"{r[c]:>17d}" for c in cols))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
