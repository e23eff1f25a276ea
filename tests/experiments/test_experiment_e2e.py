"""`kimi-train -m experiment=qk_clip_stability` end to end at toy size, then kimi-train-report on its output."""

from __future__ import annotations

import os
import subprocess
import sys

from kimi_train.analysis.report import build_report

# A 2-layer, 64-wide model on 200 kB of text: seconds per run. The experiment's own lr/tau/sweep stay.
TOY = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "train.seq_len=32", "train.micro_batch_size=4", "train.steps=6", "train.val_batches=1",
    "data.max_bytes=200000", "logging.progress_bar=false", "logging.plots=false", "optim.qk_clip.tau=0.05",
]  # fmt: skip


def test_stability_multirun_writes_both_arms_and_reports(tmp_path):
    sweep_dir = tmp_path / "qk_clip_stability"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "kimi_train.train", "-m", "experiment=qk_clip_stability",
                           f"run_dir={sweep_dir}", *TOY], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # One directory per arm, named by the swept key only.
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["muon", "muonclip"]
    runs, _ = build_report([sweep_dir])
    by = {r.optimizer: r for r in runs}
    assert set(by) == {"muon", "muonclip"}
    assert all(r.steps == 6 and r.lr == 0.05 for r in runs)
    assert by["muon"].tau is None and by["muon"].heads_clipped == 0
    # tau = 0.05 is below any logit: MuonClip must clip from the first step, and the next
    # steps' logits start from the clipped weights (far below Muon's).
    assert by["muonclip"].tau == 0.05 and by["muonclip"].first_clip_step == 1
    assert by["muonclip"].heads_clipped > 0
    assert by["muonclip"].max_logit_after_first_clip < by["muon"].peak_max_logit
