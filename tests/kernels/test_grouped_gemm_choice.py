"""The grouped GEMM's "auto" choice map: tuned once before training, saved, reused, never timed mid-run.

The CUDA policy runs here on CPU with the timing stubbed out and the Triton path declared
usable (``_time_backend_ms`` and ``_triton_usable`` are the module's hooks); no kernel runs.
The agreement across ranks is tested in tests/distributed/test_grouped_gemm_choice_ranks.py.
"""

import json

import pytest
import torch

from kimi_train.kernels import grouped_gemm as gg
from kimi_train.kernels.grouped_gemm import resolve_backend, tune_grouped_gemm
from kimi_train.model.moe import GroupedExperts

SHAPE = (4, 16, 8)  # (E, K, N)


def _never_timed(name, x, w, offs):
    raise AssertionError(f"timed {name} at {tuple(x.shape)}: the choice should have come from the map")


def _tensors(T, E=4, K=16, N=8):
    offs_E = (torch.arange(1, E + 1) * T // E).to(torch.int32)
    return torch.randn(T, K), torch.randn(E, N, K).transpose(1, 2), offs_E


@pytest.fixture(autouse=True)
def _fresh_map(monkeypatch):
    monkeypatch.setattr(gg, "_choices", {})
    monkeypatch.delenv("KIMI_TRAIN_GROUPED_GEMM", raising=False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Both candidates usable; Triton 'faster' from T = 8 on. Returns the (backend, T) timed."""
    timed = []

    def fake_time_ms(name, x, w, offs):
        timed.append((name, x.shape[0]))
        return {"torch": 2.0, "triton": 1.0 if x.shape[0] >= 8 else 3.0}[name]

    monkeypatch.setattr(gg, "_triton_usable", lambda x: True)
    monkeypatch.setattr(gg, "_time_backend_ms", fake_time_ms)
    return timed


def test_cpu_tunes_without_timing_to_the_fixed_rule(monkeypatch):
    # On CPU only one candidate can run each key: the map is the fixed rule, nothing is timed.
    monkeypatch.setattr(gg, "_time_backend_ms", _never_timed)
    model = torch.nn.ModuleList([GroupedExperts(4, 16, 8), GroupedExperts(4, 16, 8), GroupedExperts(2, 3, 5)])
    choices = tune_grouped_gemm(model, max_tokens=12, device="cpu", dtype=torch.float32)
    # (E, K, N): gate/up (E, D, I), down (E, I, D); buckets 1, 2, 4, 8, 16
    assert len(choices) == 4 * 5
    assert choices["16,8,4,float32,16"] == "torch" and choices["8,16,4,float32,1"] == "torch"
    assert choices["3,5,2,float32,4"] == "loop"  # 12-byte rows: grouped_mm's alignment fails
    assert gg._choices == choices  # installed
    x, w, offs = _tensors(12)
    assert resolve_backend(x, w, offs) == "torch"


def test_cuda_policy_fastest_wins_a_failure_loses(fake_cuda, monkeypatch):
    choices = tune_grouped_gemm([SHAPE], max_tokens=16, device="cpu", dtype=torch.float32)
    assert choices == {f"16,8,4,float32,{T}": "torch" if T < 8 else "triton" for T in (1, 2, 4, 8, 16)}
    assert [T for name, T in fake_cuda if name == "triton"] == [16, 8, 4, 2, 1]  # largest first (autotuning)
    assert resolve_backend(*_tensors(12)) == "triton"  # bucket 16
    assert resolve_backend(*_tensors(3)) == "torch"  # bucket 4

    failing = {"triton"}

    def some_fail(name, x, w, offs):
        if name in failing:
            raise RuntimeError(f"{name} unsupported on this GPU")
        return 5.0

    monkeypatch.setattr(gg, "_time_backend_ms", some_fail)
    assert set(tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32).values()) == {"torch"}
    failing.add("torch")
    assert set(tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32).values()) == {"loop"}


def test_save_then_load_reuses_the_map_without_timing(fake_cuda, monkeypatch, tmp_path):
    path = tmp_path / "run" / "grouped_gemm_choices.json"
    first = tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32, path=path)
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["choices"] == first

    gg._choices.clear()  # a new process
    monkeypatch.setattr(gg, "_time_backend_ms", _never_timed)
    assert tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32, path=path) == first
    assert gg._choices == first
    assert resolve_backend(*_tensors(12)) == "triton"  # the loaded choice is the one used
    assert json.loads(path.read_text()) == record  # nothing new: not rewritten


def test_resume_with_larger_batches_tunes_only_the_new_keys(fake_cuda, tmp_path):
    path = tmp_path / "grouped_gemm_choices.json"
    first = tune_grouped_gemm([SHAPE], 4, "cpu", torch.float32, path=path)
    fake_cuda.clear()
    second = tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32, path=path)
    assert sorted({T for _, T in fake_cuda}) == [8, 16]
    assert second == {**first, "16,8,4,float32,8": "triton", "16,8,4,float32,16": "triton"}
    assert json.loads(path.read_text())["choices"] == second


def test_a_map_from_another_device_is_retuned_with_a_warning(fake_cuda, tmp_path):
    path = tmp_path / "grouped_gemm_choices.json"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "choices": {"16,8,4,float32,1": "triton"}}))
    with pytest.warns(UserWarning, match="tuned on 'NVIDIA H100 80GB HBM3', this run is on 'cpu'"):
        choices = tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32, path=path)
    assert choices["16,8,4,float32,1"] == "torch" and fake_cuda
    assert json.loads(path.read_text())["device"] == "cpu"


def test_a_key_missing_from_the_map_takes_the_fixed_default_untimed(fake_cuda, monkeypatch):
    tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32)
    monkeypatch.setattr(gg, "_time_backend_ms", _never_timed)
    assert resolve_backend(*_tensors(12)) == "triton"  # in the map
    assert resolve_backend(*_tensors(12, E=8)) == "torch"  # another expert count
    assert resolve_backend(*_tensors(12, K=32)) == "torch"  # another width
    assert resolve_backend(*_tensors(40)) == "torch"  # past the largest bucket
    x, w, offs = _tensors(12)
    assert resolve_backend(x.double(), w.double(), offs) == "torch"  # another dtype
    monkeypatch.setattr(gg, "_triton_usable", lambda x: False)
    assert resolve_backend(x, w, offs) == "torch"  # the map's choice cannot run here


def test_the_environment_override_wins_over_the_map(fake_cuda, monkeypatch):
    tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32)
    x, w, offs = _tensors(12)
    assert resolve_backend(x, w, offs) == "triton"
    for name in ("loop", "torch"):
        monkeypatch.setenv("KIMI_TRAIN_GROUPED_GEMM", name)
        assert resolve_backend(x, w, offs) == name
    # With the override set nothing is timed (it may be set because a kernel crashes here).
    gg._choices.clear()
    monkeypatch.setattr(gg, "_time_backend_ms", _never_timed)
    assert tune_grouped_gemm([SHAPE], 16, "cpu", torch.float32) == {}


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="max_tokens=0"):
        tune_grouped_gemm([SHAPE], 0, "cpu", torch.float32)
    path = tmp_path / "grouped_gemm_choices.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a grouped GEMM choice map.*delete it to re-tune"):
        tune_grouped_gemm([SHAPE], 4, "cpu", torch.float32, path=path)
    path.write_text(json.dumps({"device": "cpu", "choices": {"16,8,4,float32,1": "cutlass"}}))
    with pytest.raises(ValueError, match="names backend 'cutlass'"):
        tune_grouped_gemm([SHAPE], 4, "cpu", torch.float32, path=path)
