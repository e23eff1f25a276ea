"""kimi-train-report on synthetic run directories: every figure checked against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kimi_train.analysis.report import build_report, main, markdown_table
from kimi_train.analysis.runs import smoothed, summarise


def write_run(run_dir: Path, records: list[dict], optim: str = "muonclip", lr: float = 0.01, tau: float = 30.0,
              clip: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(
        f"optim:\n  name: {optim}\n  lr: {lr}\n  qk_clip:\n    enabled: {str(clip).lower()}\n    tau: {tau}\n")
    return run_dir


def rec(step: int, loss, max_logit=None, clipped: int = 0, tps: float = 1000.0, **extra) -> dict:
    r = {"step": step, "loss": loss, "tokens_per_s": tps, "elapsed_s": step * 0.5, "clipped_heads": clipped}
    if max_logit is not None:
        r["max_logit"] = max_logit
    return {**r, **extra}


@pytest.fixture
def clip_run(tmp_path) -> Path:
    return write_run(tmp_path / "clip", [
        rec(1, 5.0, 0.2, tps=10.0),           # start-up interval: left out of tokens/s
        rec(2, 4.0, 35.0, clipped=3, tps=900.0),   # first clip at step 2
        rec(3, 3.0, 31.0, clipped=1, tps=1100.0),
        rec(4, 3.5, 29.0, tps=1000.0, val_loss=3.6),
        rec(5, 2.5, 30.5, clipped=2, tps=1200.0),
        rec(6, 3.0, 28.0, tps=800.0, val_loss=3.1),
    ])


def test_summary_figures(clip_run):
    s = summarise(clip_run)
    assert (s.optimizer, s.lr, s.tau, s.steps) == ("muonclip", 0.01, 30.0, 6)
    assert s.final_loss == 3.0 and s.best_loss == 2.5
    assert s.final_val_loss == 3.1
    assert s.peak_max_logit == 35.0
    assert s.heads_clipped == 6
    assert s.first_clip_step == 2
    assert s.max_logit_after_first_clip == 31.0  # steps 3..6; step 2 is the pre-clip logit
    assert s.median_max_logit_after_first_clip == 29.75  # median of 31, 29, 30.5, 28
    assert s.tokens_per_s == 1000.0  # median of 900, 1100, 1000, 1200, 800
    assert s.elapsed_s == 3.0


def test_qk_clip_off_reads_as_muon(tmp_path):
    records = [rec(1, 5.0, 0.2), rec(2, 4.0, 35.0, clipped=3)]
    assert summarise(write_run(tmp_path / "k2", records)).optimizer == "muonclip"
    assert summarise(write_run(tmp_path / "off", records, clip=False)).optimizer == "muon"


def test_post_step_max_logit_columns(tmp_path, clip_run):
    """logging.post_step_max_logit runs: max and median from the first clip's step on (inclusive:
    that step's post-step value is already after its clip); absent from runs without it."""
    post = write_run(tmp_path / "post", [
        rec(1, 5.0, 0.2, max_logit_post_step=0.3),
        rec(2, 4.0, 35.0, clipped=3, max_logit_post_step=31.0),
        rec(3, 3.0, 31.0, clipped=1, max_logit_post_step=30.3),
        rec(4, 3.5, 29.0, max_logit_post_step=33.0),
        rec(5, 2.5, 30.5, clipped=2, max_logit_post_step=30.0),
    ])
    s = summarise(post)
    assert s.max_post_step_after_first_clip == 33.0
    assert s.median_post_step_after_first_clip == pytest.approx(30.65)  # 31, 30.3, 33, 30
    assert summarise(clip_run).max_post_step_after_first_clip is None
    table = markdown_table([summarise(clip_run), s], smooth=1)
    assert "post-step max logit after 1st clip: max (median)" in table
    assert "| 33.0 (1.10 tau; median 1.02 tau) |" in table
    assert markdown_table([summarise(clip_run)], smooth=1).count("post-step") == 0


def test_smoothing_is_a_trailing_mean(clip_run):
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([1.0, 3.0, 5.0], 10) == [1.0, 2.0, 3.0]
    s = summarise(clip_run, smooth=3)
    assert s.final_loss == pytest.approx((3.5 + 2.5 + 3.0) / 3)
    assert s.best_loss == pytest.approx(3.0)  # min over the smoothed curve: (3.5 + 2.5 + 3.0) / 3 = 3.0
    with pytest.raises(ValueError, match="smoothing window 0"):
        smoothed([1.0], 0)


def test_non_finite_values_and_unclipped_runs(tmp_path):
    run = write_run(tmp_path / "muon", [
        rec(1, 5.0, "-inf"), rec(2, 4.0, 120.0), rec(3, "nan", "inf"), rec(4, "inf", 90.0)],
        optim="muonclip", clip=False)  # muonclip with qk_clip disabled reads as muon
    s = summarise(run)
    assert s.optimizer == "muon" and s.tau is None
    assert math.isnan(s.final_loss) is False and math.isinf(s.final_loss)
    assert s.best_loss == 4.0
    assert s.peak_max_logit == math.inf  # a diverged logit is reported as such, not skipped
    assert s.heads_clipped == 0 and s.first_clip_step is None and s.max_logit_after_first_clip is None
    table = markdown_table([s])
    assert "| muon | muon | 0.01 | - | 4 | inf | 4.0000 | - | inf |" in table


def test_steps_to_target_and_ratio(tmp_path):
    adamw = write_run(tmp_path / "sweep" / "adamw", [rec(s, 4.0 - 0.1 * s) for s in range(1, 11)], optim="adamw",
                      clip=False)  # final loss 3.0 at step 10
    write_run(tmp_path / "sweep" / "muon", [rec(s, 4.0 - 0.2 * s) for s in range(1, 11)], optim="muon", clip=False)
    write_run(tmp_path / "sweep" / "slow", [rec(s, 4.0 - 0.05 * s) for s in range(1, 11)], optim="muon", lr=0.1,
              clip=False)
    runs, target = build_report([tmp_path / "sweep"], steps_to_target_of=adamw)
    assert target == pytest.approx(3.0)
    by = {Path(r.run_dir).name: r for r in runs}
    assert by["adamw"].steps_to_target == 10 and by["adamw"].target_ratio == 1.0
    assert by["muon"].steps_to_target == 5 and by["muon"].target_ratio == 0.5  # 4 - 0.2 * 5 = 3.0
    assert by["slow"].steps_to_target is None and by["slow"].target_ratio is None
    table = markdown_table(runs)
    assert "not reached" in table and "| 5 | 0.50 |" in table
    best, _ = build_report([tmp_path / "sweep"], target_loss=3.0, best_only=True)
    assert [(Path(r.run_dir).name, r.optimizer) for r in best] == [("adamw", "adamw"), ("muon", "muon")]


def test_cli_table_json_and_plots(clip_run, tmp_path, capsys):
    muon = write_run(tmp_path / "muon", [rec(s, 5.0 - 0.3 * s, 2.0 * 3**s) for s in range(1, 7)], optim="muon",
                     lr=0.03, clip=False)
    diverged = write_run(tmp_path / "diverged", [rec(1, 5.0, 3.0), rec(2, "nan", "inf")], optim="muon", lr=0.3,
                         clip=False)
    out = tmp_path / "plots"
    main([str(clip_run), str(muon), str(diverged), "--steps-to-target-of", str(muon), "--json", str(tmp_path / "r.json"),
          "--plots", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("target loss: 3.2000")
    assert "| clip | muonclip | 0.01 | 30 | 6 |" in text and "| 6 | 31.0 (1.03 tau) |" in text
    rows = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [r["label"] for r in rows] == ["clip", "muon", "diverged"] and rows[1]["steps_to_target"] == 6
    main([str(clip_run), str(muon), "--plots", str(tmp_path / "arms")])  # one lr per optimizer: the overlay
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["best_curves.png", "lr_sweep.png"]
    assert sorted(p.name for p in (tmp_path / "arms").iterdir()) == ["stability.png"]
    for png in [*out.iterdir(), tmp_path / "arms" / "stability.png"]:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000


@pytest.mark.parametrize("args,message", [
    (["{tmp}/missing"], "has no metrics.jsonl"),
    (["{tmp}/empty"], "metrics.jsonl has no logged steps yet"),  # a run killed before its first log
    (["{run}", "--smooth", "0"], "smoothing window 0"),
    (["{run}", "--target-loss", "1", "--steps-to-target-of", "{run}"], "either --steps-to-target-of or --target-loss"),
])
def test_cli_errors_are_one_line_exit_2(args, message, clip_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "val_loss": 3.0}\n{"cut by a cra')
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path, run=clip_run) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kimi-train-report: ") and message in err and "\n" not in err
