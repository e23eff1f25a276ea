"""Self-verifying checkpoints on 2 gloo ranks (FSDP, one DCP shard per rank).

One session: save steps 2 and 4 (the manifest lists both ranks' shards and RNG files), load
step 4 back exactly; flip a byte of rank 1's shard of step 4 (only rank 1 touches it, and only
one rank hashes it): BOTH ranks warn and load step 2; a disk that fills up on rank 1 only (in
DCP's write of its shard, then in its RNG file) makes BOTH ranks raise the same one-line error
(no hang), step 4 stays the latest; then the save of step 6 works.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from _spawn import spawn

CONFIG = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
FAULT = "KIMI_TRAIN_DEBUG_FAIL_IN_SAVE"


def _build(seed: int, world: int):
    from kimi_train.model import KimiForCausalLM
    from kimi_train.model.config import ModelConfig
    from kimi_train.parallel import ParallelDims, parallelize_model

    torch.manual_seed(seed)
    cfg = ModelConfig(**CONFIG)
    dims = ParallelDims.from_config({}, world, cfg)
    model = parallelize_model(KimiForCausalLM(cfg), dims, dims.build_mesh("cpu"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _full_state(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _load(run: Path, world: int) -> dict:
    from kimi_train.loop import checkpoint as ckpt
    from kimi_train.parallel.fsdp_engine import FSDP2State

    model, opt = _build(1, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, state = ckpt.load_latest(run, FSDP2State(model, opt))
    return {"path": path.name, "state": state, "model": _full_state(model), "rng": ckpt.rng_state()["torch"],
            "warnings": [str(w.message) for w in caught]}


def _failed_save(run: Path, model, opt, fault: str) -> str:
    from kimi_train.loop import checkpoint as ckpt
    from kimi_train.parallel.fsdp_engine import FSDP2State

    os.environ[FAULT] = fault
    try:
        ckpt.save_checkpoint(run, 6, FSDP2State(model, opt), {}, keep=3)
        return "saved"
    except ckpt.CheckpointError as e:
        return str(e)
    finally:
        del os.environ[FAULT]


def _worker(rank: int, world: int, out: str) -> None:
    from kimi_train.loop import checkpoint as ckpt
    from kimi_train.parallel.fsdp_engine import FSDP2State

    run = Path(out) / "run"
    model, opt = _build(0, world)
    saved = {}
    for step in (2, 4):
        tokens = torch.randint(0, model.config.vocab_size, (2, 17))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        saved[step] = {"model": _full_state(model), "rng": ckpt.rng_state()["torch"], "state": {"position": step}}
        ckpt.save_checkpoint(run, step, FSDP2State(model, opt), {"position": step}, keep=3)

    intact = _load(run, world)
    dist.barrier()
    if rank == 1:
        shard = run / "checkpoints" / "step_00000004" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    dist.barrier()
    damaged = _load(run, world)

    failures = [_failed_save(run, model, opt, f"ENOSPC:step_00000006.tmp/{name}")
                for name in ("__1_0.distcp", "rng_rank1.json")]
    after_failures = ckpt.latest_checkpoint(run).name
    ckpt.save_checkpoint(run, 6, FSDP2State(model, opt), {}, keep=3)
    result = {"failures": failures, "after_failures": after_failures,
              "step6_problems": ckpt.verify_checkpoint(ckpt.checkpoint_path(run, 6))}
    for name, loaded, want in (("intact", intact, saved[4]), ("damaged", damaged, saved[2])):
        result[name] = {"path": loaded["path"], "warnings": loaded["warnings"],
                        "state_equal": loaded["state"] == {**want["state"], "step": int(loaded["path"][5:])},
                        "rng_equal": loaded["rng"] == want["rng"],
                        "model_equal": all(torch.equal(v, want["model"][k]) for k, v in loaded["model"].items())}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_verify_agree_fall_back_together_and_fail_saves_together(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "MANIFEST.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.json", "rng_rank1.json", ".metadata",
            "trainer_state.json"} == set(manifest["files"])
    for r in ranks:
        assert r["intact"] == {"path": "step_00000004", "warnings": [], "state_equal": True, "rng_equal": True,
                               "model_equal": True}
        assert r["damaged"]["path"] == "step_00000002"
        assert r["damaged"]["state_equal"] and r["damaged"]["rng_equal"] and r["damaged"]["model_equal"]
        [warning] = r["damaged"]["warnings"]
        assert "step_00000004 is damaged: __1_0.distcp has CRC-32" in warning
        assert warning.endswith("trying the previous one, step_00000002")
        shard, rng = r["failures"]
        assert shard.startswith("cannot save checkpoint step_00000006: No space left on device (")
        assert shard.endswith("step_00000006.tmp/__1_0.distcp); the previous checkpoint "
                              f"{tmp_path / 'run' / 'checkpoints' / 'step_00000004'} is kept")
        assert rng.startswith("cannot save checkpoint step_00000006: No space left on device (")
        assert "step_00000006.tmp/rng_rank1.json)" in rng
        assert r["after_failures"] == "step_00000004" and r["step6_problems"] == []
    assert ranks[0] == ranks[1]
