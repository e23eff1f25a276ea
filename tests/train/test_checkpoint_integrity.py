"""Checkpoints verify themselves: a damaged newest checkpoint is named in a warning and the one
before it loads; none usable is one line; a failed save (disk full, permission denied) keeps the
previous checkpoint loadable and the next save works.

In-process on CPU: a 2-layer model and AdamW built directly (no Trainer), two checkpoints, the
newest damaged one file at a time.
"""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from kimi_train.errors import UserError
from kimi_train.loop import checkpoint as ckpt
from kimi_train.parallel.fsdp_engine import FSDP2State
from kimi_train.tools.run_model import load_model_from_run
from kimi_train.model import KimiForCausalLM
from kimi_train.model.config import ModelConfig

CONFIG = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)


def _build(seed: int):
    torch.manual_seed(seed)
    model = KimiForCausalLM(ModelConfig(**CONFIG))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train_step(model, opt) -> None:
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad()


def _snapshot(model, opt, trainer_state) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optim": {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())},
            "rng": ckpt.rng_state(), "trainer_state": trainer_state}


def _assert_loaded(snapshot, model, opt, trainer_state) -> None:
    assert trainer_state == snapshot["trainer_state"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot["model"][k]), k
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            assert torch.equal(v, snapshot["optim"][i][k]), (i, k)
    assert ckpt.rng_state() == snapshot["rng"]


def _two_checkpoints(run: Path, keep: int = 3) -> dict[int, dict]:
    """Checkpoints at steps 2 and 4, each after a training step; their contents by step."""
    model, opt = _build(0)
    saved = {}
    for step in (2, 4):
        _train_step(model, opt)
        state = {"skipped_steps": 0, "data": {"position": 10 * step}}
        saved[step] = _snapshot(model, opt, {**state, "step": step})
        ckpt.save_checkpoint(run, step, FSDP2State(model, opt), state, keep=keep)
    return saved


def _load_latest(run: Path, **kw):
    model, opt = _build(1)
    _train_step(model, opt)  # optimizer state to overwrite
    torch.manual_seed(99)  # RNG states to overwrite
    found = ckpt.load_latest(run, FSDP2State(model, opt), **kw)
    return found, model, opt


# ------------------------------------------------------------------ damage
def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_manifest_value(path: Path) -> None:
    text = path.read_text()
    i = text.index('"crc32": "') + len('"crc32": "')
    path.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1:])


DAMAGE = [  # (file, damage, what the warning says about it)
    ("__0_0.distcp", _truncate, r"__0_0\.distcp has \d+ bytes, the manifest says \d+ \(truncated\)"),
    (".metadata", _truncate, r"\.metadata has \d+ bytes, the manifest says \d+ \(truncated\)"),
    ("trainer_state.json", _truncate, r"trainer_state\.json has \d+ bytes.*\(truncated\)"),
    ("rng_rank0.json", _truncate, r"rng_rank0\.json has \d+ bytes.*\(truncated\)"),
    ("MANIFEST.json", _truncate, r"MANIFEST\.json is unreadable"),
    ("__0_0.distcp", _flip, r"__0_0\.distcp has CRC-32 [0-9a-f]{8}, the manifest says [0-9a-f]{8} \(damaged\)"),
    (".metadata", _flip, r"\.metadata has CRC-32 .* \(damaged\)"),
    ("trainer_state.json", _flip, r"trainer_state\.json has CRC-32 .* \(damaged\)"),
    ("rng_rank0.json", _flip, r"rng_rank0\.json has CRC-32 .* \(damaged\)"),
    ("MANIFEST.json", _flip_manifest_value, r"MANIFEST\.json does not match its own checksum"),
    ("__0_0.distcp", Path.unlink, r"__0_0\.distcp is missing"),
    (".metadata", Path.unlink, r"\.metadata is missing"),
    ("trainer_state.json", Path.unlink, r"trainer_state\.json is missing"),
    ("rng_rank0.json", Path.unlink, r"rng_rank0\.json is missing"),
    ("MANIFEST.json", Path.unlink, r"MANIFEST\.json is missing"),
]


@pytest.mark.parametrize("name,damage,problem", DAMAGE, ids=[f"{d.__name__}-{n}" for n, d, _ in DAMAGE])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_loads(tmp_path, name, damage, problem):
    saved = _two_checkpoints(tmp_path)
    newest = ckpt.checkpoint_path(tmp_path, 4)
    damage(newest / name)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_path(tmp_path, 2)) == []
    with pytest.warns(UserWarning, match=rf"^checkpoint {newest} is damaged: .*{problem}.*; "
                                         r"trying the previous one, step_00000002$"):
        (path, state), model, opt = _load_latest(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 2)
    _assert_loaded(saved[2], model, opt, state)


def test_intact_checkpoint_loads_silently_and_exactly(tmp_path):
    saved = _two_checkpoints(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (path, state), model, opt = _load_latest(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 4)
    _assert_loaded(saved[4], model, opt, state)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    on_disk = {p.name for p in path.iterdir()} - {ckpt.MANIFEST, ckpt.COMPLETE}
    assert set(manifest) == on_disk and {"__0_0.distcp", ".metadata", "trainer_state.json", "rng_rank0.json"} <= on_disk
    assert all(e["bytes"] == (path / n).stat().st_size for n, e in manifest.items())


def test_no_checkpoint_is_none_and_a_damaged_explicit_one_is_one_line(tmp_path):
    assert _load_latest(tmp_path)[0] is None
    _two_checkpoints(tmp_path)
    _flip(ckpt.checkpoint_path(tmp_path, 4) / "__0_0.distcp")
    model, opt = _build(1)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004 is damaged: __0_0\.distcp has CRC-32") as e:
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 4), FSDP2State(model, opt))
    assert "\n" not in str(e.value)


def test_none_usable_is_one_user_error_line_naming_the_run_and_each_problem(tmp_path):
    _two_checkpoints(tmp_path)
    _truncate(ckpt.checkpoint_path(tmp_path, 4) / "__0_0.distcp")
    (ckpt.checkpoint_path(tmp_path, 2) / ckpt.MANIFEST).unlink()
    with pytest.warns(UserWarning) as caught, pytest.raises(UserError) as e:
        _load_latest(tmp_path)
    assert [str(w.message).split(": ", 1)[0] for w in caught] == [
        f"checkpoint {ckpt.checkpoint_path(tmp_path, 4)} is damaged", f"checkpoint {ckpt.checkpoint_path(tmp_path, 2)} is damaged"]
    assert str(caught[-1].message).endswith("; no older checkpoint left")
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, ValueError)  # kimi-train-export prints ValueErrors
    assert message.startswith(f"run_dir={str(tmp_path)!r}: none of its 2 complete checkpoints is usable: ")
    assert "step_00000004 (__0_0.distcp has" in message and "step_00000002 (MANIFEST.json is missing)" in message


def test_unreadable_file_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    _two_checkpoints(tmp_path)
    from kimi_train.loop.checkpoint import manifest

    crc32 = manifest._crc32

    def failing_disk(path):
        if path.name == "__0_0.distcp":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return crc32(path)

    monkeypatch.setattr(manifest, "_crc32", failing_disk)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_path(tmp_path, 4)) == ["__0_0.distcp is unreadable (Input/output error)"]


def test_sizes_only_is_cheaper_and_misses_a_flipped_bit(tmp_path):
    _two_checkpoints(tmp_path)
    newest = ckpt.checkpoint_path(tmp_path, 4)
    _flip(newest / "__0_0.distcp")
    assert ckpt.verify_checkpoint(newest, checksums=False) == []
    assert len(ckpt.verify_checkpoint(newest)) == 1


def test_checkpoint_without_manifest_is_damaged_and_the_one_before_loads(tmp_path):
    """A COMPLETE checkpoint whose manifest is gone cannot be verified: it is passed over, named."""
    saved = _two_checkpoints(tmp_path)
    (ckpt.checkpoint_path(tmp_path, 4) / ckpt.MANIFEST).unlink()
    with pytest.warns(UserWarning, match=r"step_00000004 is damaged: MANIFEST\.json is missing; trying the previous one"):
        (path, state), model, opt = _load_latest(tmp_path)
    assert path.name == "step_00000002"
    _assert_loaded(saved[2], model, opt, state)


def test_load_model_from_run_verifies_and_falls_back(tmp_path):
    from omegaconf import OmegaConf

    saved = _two_checkpoints(tmp_path)
    OmegaConf.save(OmegaConf.create({"model": CONFIG}), tmp_path / "config.yaml")
    _flip(ckpt.checkpoint_path(tmp_path, 4) / "__0_0.distcp")
    with pytest.warns(UserWarning, match=r"step_00000004 is damaged: __0_0\.distcp has CRC-32"):
        model = load_model_from_run(tmp_path)
    assert all(torch.equal(v, saved[2]["model"][k]) for k, v in model.state_dict().items())
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004 is damaged: __0_0\.distcp"):
        load_model_from_run(tmp_path, step=4)


# ------------------------------------------------------------------ failed saves
FAULTS = [  # (KIMI_TRAIN_DEBUG_FAIL_IN_SAVE, what the error says)
    ("ENOSPC:step_00000006.tmp/__0_0.distcp", r"No space left on device \(\S+/step_00000006\.tmp/__0_0\.distcp\)"),
    ("ENOSPC:step_00000006.tmp/.metadata*", r"No space left on device \(\S+/\.metadata\.tmp\)"),
    ("ENOSPC:step_00000006.tmp/rng_rank0.json", r"No space left on device \(\S+/rng_rank0\.json\)"),
    ("ENOSPC:step_00000006.tmp/trainer_state.json", r"No space left on device \(\S+/trainer_state\.json\)"),
    ("ENOSPC:step_00000006.tmp/MANIFEST.json", r"No space left on device \(\S+/MANIFEST\.json\)"),
    ("ENOSPC:step_00000006.tmp/COMPLETE", r"No space left on device \(\S+/COMPLETE\)"),
    ("EACCES:step_00000006.tmp", r"Permission denied \(\S+/checkpoints/step_00000006\.tmp\)"),
]


@pytest.mark.parametrize("fault,error", FAULTS, ids=[f.split("/")[-1] for f, _ in FAULTS])
def test_failed_save_keeps_the_previous_checkpoint_and_the_next_save_works(tmp_path, monkeypatch, fault, error):
    saved = _two_checkpoints(tmp_path, keep=1)  # keep=1: pruning early would leave nothing
    model, opt = _build(2)
    monkeypatch.setenv("KIMI_TRAIN_DEBUG_FAIL_IN_SAVE", fault)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(tmp_path, 6, FSDP2State(model, opt), {}, keep=1)
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, UserError)
    assert message.startswith("cannot save checkpoint step_00000006: ")
    assert re.search(error, message), message
    assert message.endswith(f"the previous checkpoint {ckpt.checkpoint_path(tmp_path, 4)} is kept")
    assert sorted(p.name for p in ckpt.checkpoints_root(tmp_path).iterdir()) == ["step_00000004"]  # no .tmp left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (path, state), loaded, loaded_opt = _load_latest(tmp_path)
    assert path.name == "step_00000004"
    _assert_loaded(saved[4], loaded, loaded_opt, state)

    monkeypatch.delenv("KIMI_TRAIN_DEBUG_FAIL_IN_SAVE")
    ckpt.save_checkpoint(tmp_path, 6, FSDP2State(model, opt), {}, keep=1)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [6]
    assert ckpt.verify_checkpoint(ckpt.checkpoint_path(tmp_path, 6)) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_unwritable_run_dir_is_one_line_and_keeps_the_checkpoint(tmp_path):
    _two_checkpoints(tmp_path)
    root = ckpt.checkpoints_root(tmp_path)
    root.chmod(0o555)
    try:
        model, opt = _build(2)
        with pytest.raises(ckpt.CheckpointError, match=r"^cannot save checkpoint step_00000006: Permission denied"):
            ckpt.save_checkpoint(tmp_path, 6, FSDP2State(model, opt), {}, keep=1)
    finally:
        root.chmod(0o755)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_path(tmp_path, 4)) == []


def test_saving_after_a_fallback_replaces_the_abandoned_newer_checkpoints(tmp_path):
    """Resumed from step 2 past a damaged step 4: the save of step 3 is the newest, and keep=1 keeps it."""
    _two_checkpoints(tmp_path)
    _truncate(ckpt.checkpoint_path(tmp_path, 4) / ".metadata")
    with pytest.warns(UserWarning, match="step_00000004 is damaged"):
        (path, _), model, opt = _load_latest(tmp_path)
    assert path.name == "step_00000002"
    (ckpt.checkpoints_root(tmp_path) / "step_00000005.tmp").mkdir()  # a leftover of an interrupted save
    ckpt.save_checkpoint(tmp_path, 3, FSDP2State(model, opt), {}, keep=1)
    assert sorted(p.name for p in ckpt.checkpoints_root(tmp_path).iterdir()) == ["step_00000003"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_latest(tmp_path)[0][0].name == "step_00000003"


def test_latest_usable_reads_the_trainer_state_of_the_checkpoint_that_verifies(tmp_path):
    saved = _two_checkpoints(tmp_path)
    assert ckpt.latest_usable(tmp_path) == (ckpt.checkpoint_path(tmp_path, 4), saved[4]["trainer_state"])
    _truncate(ckpt.checkpoint_path(tmp_path, 4) / "trainer_state.json")
    with pytest.warns(UserWarning, match=r"step_00000004 is damaged: trainer_state\.json has"):
        assert ckpt.latest_usable(tmp_path) == (ckpt.checkpoint_path(tmp_path, 2), saved[2]["trainer_state"])


def test_resaving_a_step_replaces_it_and_leaves_no_copy(tmp_path):
    _two_checkpoints(tmp_path)
    model, opt = _build(2)
    (ckpt.checkpoints_root(tmp_path) / "step_00000004.old").mkdir()  # a crash between the two renames
    ckpt.save_checkpoint(tmp_path, 4, FSDP2State(model, opt), {"again": True}, keep=3)
    assert sorted(p.name for p in ckpt.checkpoints_root(tmp_path).iterdir()) == ["step_00000002", "step_00000004"]
    assert ckpt.latest_usable(tmp_path)[1] == {"again": True, "step": 4}
