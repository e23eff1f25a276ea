"""kimi-train-inspect: counts on the meta device, per-rank memory, one-line errors."""

import json

import pytest

from kimi_train.tools.inspect_model import inspect, main, parse_size
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


# --- activations (kimi_train.memory.planner) ------------------------------------------------


def test_activations_are_the_planners_and_the_old_keys_stay(capsys):
    from kimi_train.memory.planner import plan_activations

    args = ["model=k2_mini", "parallel.dp_shard=4", "parallel.ep=4", "dtype=bf16", "train.seq_len=512",
            "train.micro_batch_size=2", "train.activation_checkpointing=selective", "train.recompute_moe_down_proj=true",
            "moe_imbalance=0.25"]  # fmt: skip
    report = _run(capsys, *args)
    assert {"total_params", "activated_params", "components", "router_bias_buffers", "layout", "per_rank"} <= set(report)
    act = report["activations"]
    plan = plan_activations(load_model_config("k2_mini"), 512, 2, "selective", dtype="bf16", bf16_params=True, ep=4,
                            imbalance=0.25, recompute_moe_down_proj=True)  # fmt: skip
    assert (act["kept_bytes"], act["peak_bytes"]) == (plan.kept_bytes, plan.peak_bytes)
    assert act["layers"] == {"dense": 1, "moe": 11}
    assert (act["seq_len"], act["micro_batch_size"], act["activation_checkpointing"]) == (512, 2, "selective")


def test_imbalance_loads_the_busiest_ep_rank_only():
    from kimi_train.memory.planner import plan_activations

    cfg = load_model_config("k2_mini")
    moe = lambda **kw: plan_activations(cfg, 256, 1, **kw).per_layer["moe"]  # noqa: E731
    assert moe(ep=1, imbalance=0.5) == moe(ep=1)  # one rank's experts receive its own slots, however spread
    S, D, I = 256 * 2, 1024, 288  # slots, hidden, expert width
    # none: the received slots' grouped-GEMM input [Q, D], four [Q, I] SwiGLU tensors (bf16), the
    # permutation and its inverse int64
    assert moe(ep=4, imbalance=0.5, dtype="bf16") - moe(ep=4, dtype="bf16") == S // 2 * (2 * D + 4 * 2 * I + 2 * 8)
    # full: the dispatch all-to-all output [Q, D]
    assert moe(ep=4, imbalance=0.5, mode="full") - moe(ep=4, mode="full") == S // 2 * 4 * D


def _fit(capsys, *args):
    main([*args, "json=true"])
    return json.loads(capsys.readouterr().out)


def test_gpu_mem_gives_the_largest_micro_batch_that_fits(capsys):
    from kimi_train.memory.planner import plan_activations

    cfg = load_model_config("small")
    args = ["model=small", "train.seq_len=2048", "dtype=bf16"]
    out = _fit(capsys, *args, "--gpu-mem", "12GiB")
    assert out["gpu_mem_bytes"] == 12 * 2**30
    assert (parse_size("80GB"), parse_size("0.5TiB"), parse_size("512MiB")) == (80 * 10**9, 2**39, 2**29)
    state = out["per_rank"]["memory_bytes"]["total"]
    best = {}
    for row in out["fit"]:
        b = best[row["mode"]] = row["max_micro_batch"]
        peak = lambda n: plan_activations(cfg, 2048, n, row["mode"], dtype="bf16").peak_bytes  # noqa: E731
        assert b >= 1 and state + peak(b) <= 12 * 2**30 < state + peak(b + 1)
    assert best["none"] < best["selective"] < best["full"]
    # The text table: one row per mode with the same numbers; --gpu-mem=SIZE and gpu_mem=SIZE are the same flag.
    main([*args, "--gpu-mem=12GiB"])
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()[:1] in (["none"], ["selective"], ["full"])}
    assert {mode: int(r[-1]) for mode, r in rows.items()} == best
    main([*args, "gpu_mem=12GiB"])
    assert capsys.readouterr().out == text


def test_k2_table_at_its_expert_parallel_layout(capsys):
    out = _fit(capsys, "model=k2", "parallel.dp_shard=256", "parallel.ep=16", "dtype=bf16", "train.seq_len=4096",
               "train.micro_batch_size=1", "--gpu-mem", "80GiB")  # fmt: skip
    rows = {r["mode"]: r for r in out["fit"]}
    assert rows["full"]["layers"] == {"dense": 1, "moe": 60}
    assert rows["none"]["kept_bytes"] > rows["selective"]["kept_bytes"] > rows["full"]["kept_bytes"]


@pytest.mark.parametrize("args,needle", [
    (["train.seq_len=0"], "train.seq_len=0"),
    (["train.seq_len=x"], "train.seq_len='x'"),
    (["train.micro_batch_size=-1"], "train.micro_batch_size=-1"),
    (["train.activation_checkpointing=some"], "train.activation_checkpointing='some'"),
    (["train.recompute_moe_down_proj=maybe"], "train.recompute_moe_down_proj='maybe'"),
    (["train.recompute_moe_down_proj=true"], "needs train.activation_checkpointing=selective"),
    (["moe_imbalance=-0.1"], "moe_imbalance='-0.1'"),
    (["moe_imbalance=lots"], "moe_imbalance='lots'"),
    (["--gpu-mem", "80"], "--gpu-mem='80'"),
    (["--gpu-mem=80XB"], "--gpu-mem='80XB'"),
    (["--gpu-mem"], "--gpu-mem needs a size"),
])  # fmt: skip
def test_bad_activation_input_exits_2_with_one_line(capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
