"""kimi-train-inspect: counts on the meta device, per-rank memory, one-line errors."""

import json

import pytest

from kimi_train.tools.inspect_model import inspect, main
from kimi_train.model import KimiForCausalLM, load_model_config


def _run(capsys, *args):
    main(list(args))
    return json.loads(capsys.readouterr().out)


def test_k2_counts_match_the_spec(capsys):
    report = _run(capsys, "model=k2")
    assert report["total_params"] == 1_026_408_209_408
    assert report["activated_params"] == 32_861_477_888
    assert report["components"]["routed_experts"] == 1_014_686_023_680
    assert report["router_bias_buffers"] == 60 * 384


def test_counts_add_up_and_match_a_real_model():
    cfg = load_model_config("tiny", q_lora_rank=16)
    report = inspect(cfg)
    model = KimiForCausalLM(cfg)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(report["components"].values()) == report["total_params"]
    experts = sum(m.experts.gate_proj.numel() * 3 for m in model.moe_layers())
    assert report["activated_params"] == report["total_params"] - experts + experts * 2 // 8


def test_memory_per_rank():
    cfg = load_model_config("tiny")
    one = inspect(cfg, dtype="fp32", optimizer="muon")["per_rank"]
    assert one["params"] == inspect(cfg)["total_params"]
    adamw = one["adamw_params"]  # embedding, lm_head, norms
    assert adamw == 256 * 128 * 2 + 128 * (2 * 4 + 1) + 32 * 4
    b = one["memory_bytes"]
    assert b == {"params": 4 * one["params"], "master_params_fp32": 0, "grads": 4 * one["params"],
                 "optimizer_state": 4 * one["muon_params"] + 8 * adamw, "total": b["total"]}  # fmt: skip
    bf16 = inspect(cfg, dtype="bf16", optimizer="adamw")["per_rank"]["memory_bytes"]
    assert bf16["params"] == 2 * one["params"] and bf16["master_params_fp32"] == 4 * one["params"]
    assert bf16["optimizer_state"] == 8 * one["params"]
    # 8 experts over ep=4 then dp_shard/ep=2: every tensor split 8 ways here (all dims divide).
    sharded = inspect(cfg, dp_shard=8, ep=4)["per_rank"]
    experts = sum(v for k, v in inspect(cfg)["components"].items() if k == "routed_experts")
    assert sharded["params"] < one["params"] / 4 and sharded["params"] >= experts // 8


@pytest.mark.parametrize("args,needle", [
    (["model=nope"], "unknown model config 'nope'"),
    (["model.hidden_sizee=3"], "hidden_sizee"),
    (["model.num_experts_per_tok=99"], "model.num_experts_per_tok=99"),
    (["parallel.ep=3", "parallel.dp_shard=6"], "parallel.ep=3"),
    (["parallel.dp_shard=x"], "parallel.dp_shard='x'"),
    (["dtype=fp8"], "dtype='fp8'"),
    (["colour=red"], "unknown argument 'colour'"),
])  # fmt: skip
def test_bad_input_exits_2_with_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
