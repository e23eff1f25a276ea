"""The data layer at pretraining scale (issue 22): prepare throughput and memory, training-rank memory, loader speed.

    python benchmarks/data_bench.py --mb 1024 --rank-mb 1024 --workers 2 --json docs/results/data/data_bench.json
    python benchmarks/data_bench.py --mb 40 --rank-mb 100        # a quick check of the whole script

(a) prepare: --mb MB of jsonl (the stdlib's sources repeated with a varied first line, under
    --tmp, never committed), tokenized with one 32k byte-level BPE trained beforehand on a
    20 MB sample (not timed), by `kimi-train-prepare workers=N` and by nanoGPT's pattern:
    `datasets.load_dataset("json")` (its Arrow conversion counted) + `.map(batched=True,
    num_proc=N)` + an `np.memmap` written in 1024 batches. Same tokenizer, same N, the same
    RAYON_NUM_THREADS=1 (one tokenizing thread per process), in one run. Wall time, MB/s of
    jsonl, the peak of the RSS summed over the process tree (sampled every 50 ms), and whether
    the token ids are identical (sha256 of both token streams).
(b) a training rank of the default job (tiny model, byte tokens, seq 128, micro-batch 8) on 10 MB
    and --rank-mb MB of the same jsonl prepared with the byte tokenizer: data-layer start-up
    (`build_data`, in the second process to start) and RssAnon growth over 20 steps.
(c) the loader's tokens/s (next_batch, one rank) against the training tokens/s of the same run (b, 10 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------ helpers
def run_measured(cmd: list[str], **kw) -> dict:
    """Run cmd; wall time and the peak of the RSS summed over it and its children (MB)."""
    import psutil

    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    peak, stop = [0], threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2**20, "stdout": out}


def stream_sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        for i in range(0, len(a), 1 << 24):
            h.update(np.ascontiguousarray(a[i: i + (1 << 24)], dtype=np.uint16).tobytes())
    return h.hexdigest()


def make_jsonl(path: Path, mb: int) -> None:
    sys.path.insert(0, str(ROOT))
    from kimi_train.data import stdlib_files

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    written, k = 0, 0
    with open(path, "w") as f:
        while written < mb * 2**20:
            for i, t in enumerate(texts):
                line = json.dumps({"text": f"# copy {k} of file {i}: variant {(k * 7919 + i) % 1000}\n" + t}) + "\n"
                f.write(line)
                written += len(line)
                if written >= mb * 2**20:
                    break
            k += 1


def train_bpe32k(jsonl: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        size = 0
        with open(jsonl) as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                size += len(text)
                if size > 20 * 2**20:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32768, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer=trainer)
    tok.save(str(out))


BASELINE = r'''
import sys, numpy as np, datasets
from tokenizers import Tokenizer
src, tok_path, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer.from_file(tok_path)
eot = tok.token_to_id("<|endoftext|>")
def process(batch):
    ids = [e.ids + [eot] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
    return {"ids": ids, "len": [len(x) for x in ids]}
ds = datasets.load_dataset("json", data_files=src, split="train", cache_dir=out + ".cache")
ds = ds.map(process, batched=True, num_proc=n, remove_columns=["text"])
total = int(np.sum(ds["len"], dtype=np.uint64))
arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(total,))
idx, shards = 0, 1024
for i in range(shards):
    batch = ds.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
    ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
    arr[idx: idx + len(ids)] = ids
    idx += len(ids)
arr.flush()
print(total)
'''


def bench_prepare(tmp: Path, jsonl: Path, tok: Path, workers: int) -> dict:
    mb = jsonl.stat().st_size / 2**20
    base_out = tmp / "baseline.bin"
    base = run_measured([sys.executable, "-c", BASELINE, str(jsonl), str(tok), str(base_out), str(workers)])
    ours_out = tmp / "prepared"
    ours = run_measured([sys.executable, "-m", "kimi_train.tools.prepare", "data=files", f"data.paths=[{jsonl}]",
                         "data.max_bytes=0", "data.tokenizer=hf", f"data.tokenizer_path={tok}",
                         f"data.cache_dir={tmp / 'cache'}", f"out={ours_out}", f"workers={workers}",
                         "progress=false", "force=true"])
    manifest = json.loads((ours_out / "manifest.json").read_text())
    ours_sha = stream_sha(np.memmap(ours_out / f"{s['prefix']}.bin", dtype=np.uint16, mode="r")
                          for s in manifest["shards"])
    base_sha = stream_sha([np.memmap(base_out, dtype=np.uint16, mode="r")])
    row = lambda r: {"wall_s": r["wall_s"], "mb_per_s": mb / r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
    return {"jsonl_mb": mb, "workers": workers, "tokens": manifest["tokens"], "ours": row(ours),
            "baseline": row(base), "throughput_ratio": base["wall_s"] / ours["wall_s"],
            "token_ids_identical": ours_sha == base_sha}


RANK = r'''
import json, sys, time
from pathlib import Path
import torch
from kimi_train.config import DataConfig, LoggingConfig, TrainConfig, TrainLoopConfig, validate
from kimi_train.data import build_data
from kimi_train.model import load_model_config
data_dir, run_dir, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
data = DataConfig(source="prepared", paths=[data_dir])
cfg = validate(TrainConfig(model=load_model_config("tiny", vocab_size=vocab), data=data,
                           train=TrainLoopConfig(steps=20, val_batches=0),
                           logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False)))
t0 = time.perf_counter(); d = build_data(cfg, 0, 1, 1); startup = time.perf_counter() - t0
n = 100
t0 = time.perf_counter()
for _ in range(n):
    d.loader.next_batch()
loader_tps = n * d.loader.global_batch * cfg.train.seq_len / (time.perf_counter() - t0)
from kimi_train.loop.trainer import Trainer
trainer = Trainer(cfg, run_dir)
before = rss_anon()
t0 = time.perf_counter()
for _ in range(20):
    trainer.train_step(); trainer.step += 1
train_tps = 20 * trainer.tokens_per_step / (time.perf_counter() - t0)
print(json.dumps({"startup_s": startup, "rss_anon_growth_mb": rss_anon() - before, "rss_anon_mb": rss_anon(),
                  "loader_tokens_per_s": loader_tps, "train_tokens_per_s": train_tps}))
'''


def bench_rank(tmp: Path, data_dir: str, vocab: int) -> dict:
    runs = []
    for i in range(2):  # the second start is the one reported (the first may build caches)
        r = run_measured([sys.executable, "-c", RANK, data_dir, str(tmp / f"run-{Path(data_dir).name}-{i}"), str(vocab)])
        runs.append(json.loads(r["stdout"].strip().splitlines()[-1]))
    return {**runs[1], "first_startup_s": runs[0]["startup_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=1024, help="jsonl size for (a)")
    p.add_argument("--rank-mb", type=int, default=1024, help="jsonl size of the large set of (b)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tmp", default="/tmp/kimi_data_bench")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    jsonl, tok = tmp / f"corpus-{args.mb}mb.jsonl", tmp / "bpe32k.json"
    if not jsonl.exists():
        make_jsonl(jsonl, args.mb)
    if not tok.exists():
        train_bpe32k(jsonl, tok)
    result = {"machine": f"{platform.node()} {os.cpu_count()} cores (shared with other jobs)",
              "load_avg_start": os.getloadavg()[0], "prepare": bench_prepare(tmp, jsonl, tok, args.workers)}
    big = tmp / f"corpus-{args.rank_mb}mb.jsonl"
    if not big.exists():
        make_jsonl(big, args.rank_mb)
    sets = {}
    for name, cap in (("10mb", 10_000_000), (f"{args.rank_mb}mb", 0)):
        sets[name] = run_measured([sys.executable, "-m", "kimi_train.tools.prepare", "data=files",
                                   f"data.paths=[{big}]", f"data.max_bytes={cap}", f"data.cache_dir={tmp / 'cache'}",
                                   f"out={tmp / ('byte-' + name)}", f"workers={args.workers}", "progress=false",
                                   "force=true"])
    result["byte_prepare"] = {k: {"wall_s": v["wall_s"], "peak_rss_mb": v["peak_rss_mb"]} for k, v in sets.items()}
    result["rank"] = {k: bench_rank(tmp, str(tmp / f"byte-{k}"), 256) for k in sets}
    result["load_avg_end"] = os.getloadavg()[0]
    a, r = result["prepare"], result["rank"]
    dj = r["10mb"]
    print(f"(a) prepare {a['jsonl_mb']:.0f} MB jsonl, {a['tokens']:,} tokens, N={a['workers']}")
    print(f"    {'':10s} {'wall s':>8s} {'MB/s':>8s} {'peak RSS MB (sum)':>18s}")
    for side in ("ours", "baseline"):
        print(f"    {side:10s} {a[side]['wall_s']:8.1f} {a[side]['mb_per_s']:8.2f} {a[side]['peak_rss_mb']:18.0f}")
    print(f"    throughput ours/baseline {a['throughput_ratio']:.2f}x, token ids identical: {a['token_ids_identical']}")
    print("(b) training rank   start-up s (1st / 2nd)   RssAnon growth over 20 steps MB")
    for k in r:
        print(f"    {k:14s} {r[k]['first_startup_s']:8.3f} / {r[k]['startup_s']:.3f} {r[k]['rss_anon_growth_mb']:18.1f}")
    print(f"(c) default model and batch: loader {dj['loader_tokens_per_s']:,.0f} tokens/s vs training "
          f"{dj['train_tokens_per_s']:,.0f} tokens/s ({dj['loader_tokens_per_s'] / dj['train_tokens_per_s']:.0f}x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
