"""FSDP / EP / FSDP x EP (and HSDP x EP) training of a tiny MoE with MuonClip vs one process.

gloo on CPU, 2 and 4 processes, 10 steps, fp32 Newton-Schulz (bf16 NS would turn reduction-order
noise into bf16 rounding differences). Tolerances:
- losses: 1e-5 relative, every step (measured: <= 4e-7);
- first-step gradients: 1e-4 relative + 1e-8 absolute (measured ~1e-6). This is the check that
  catches the EP gradient-scaling trap: Muon normalises its update, so an expert gradient ``ep``
  times too large would NOT show in the losses;
- final parameters: 5e-5 absolute (measured <= 1.6e-5; weights are O(0.02 - 1));
- QK-Clip clips the same number of heads every step as one process, and at least one.
Also: checkpoints reshard (DCP): 2 ranks -> 1 and 1 -> 2 continue the single-process curve.
"""

from __future__ import annotations

import pytest
import torch

from _spawn import spawn
from _train_harness import STEPS, train

HALF = STEPS // 2


@pytest.fixture(scope="module")
def reference():
    return train(None)


def _worker(rank: int, world: int, parallel: dict, out: str, kwargs: dict) -> None:
    result = train(parallel, **kwargs)
    if rank == 0:
        torch.save(result, out)


def _run(tmp_path, world: int, parallel: dict, **kwargs) -> dict:
    out = str(tmp_path / "result.pt")
    spawn(_worker, world, parallel, out, kwargs)
    return torch.load(out)


def _assert_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: loss {g} vs single-process {w}"


@pytest.mark.parametrize(
    "world,parallel",
    [
        (2, {}),  # FSDP only
        (2, {"ep": 2}),  # EP only (efsdp = 1)
        (4, {"ep": 2}),  # FSDP x EP (efsdp = 2)
        (4, {"dp_replicate": 2, "ep": 2}),  # HSDP x EP
    ],
    ids=["fsdp2", "ep2", "fsdp2xep2", "hsdp2xep2"],
)
def test_parity_with_single_process(tmp_path, reference, world, parallel):
    got = _run(tmp_path, world, parallel)
    _assert_losses(got["losses"], reference["losses"])
    assert got["clipped"] == reference["clipped"] and sum(got["clipped"]) > 0, (got["clipped"], reference["clipped"])
    assert got["grad_norm0"] == pytest.approx(reference["grad_norm0"], rel=1e-5)
    for name, g in reference["grads0"].items():
        torch.testing.assert_close(got["grads0"][name], g, rtol=1e-4, atol=1e-8, msg=lambda m: f"grad {name}: {m}")
    for name, p in reference["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=0, atol=5e-5, msg=lambda m: f"param {name}: {m}")
    for name, b in reference["buffers"].items():
        torch.testing.assert_close(got["buffers"][name], b, rtol=0, atol=1e-6)


def test_reshard_resume_2_to_1_and_1_to_2(tmp_path, reference):
    # 2 ranks (FSDP) save at HALF, one process resumes
    _run(tmp_path, 2, {}, steps=HALF, save_dir=str(tmp_path / "a"), save_step=HALF)
    resumed = train(None, load_dir=str(tmp_path / "a"))
    _assert_losses(resumed["losses"], reference["losses"][HALF:])
    # one process saves at HALF, 2 ranks (FSDP x EP) resume
    train(None, steps=HALF, save_dir=str(tmp_path / "b"), save_step=HALF)
    resumed = _run(tmp_path, 2, {"ep": 2}, load_dir=str(tmp_path / "b"))
    _assert_losses(resumed["losses"], reference["losses"][HALF:])
