"""Parity with transformers' DeepseekV3ForCausalLM (built from a config object, no network)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kimi_train.tools.hf import export, load  # noqa: E402
from kimi_train.model import KimiForCausalLM, load_model_config  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            init_std=0.1)  # fmt: skip

CASES = {
    "mla_no_qlora": dict(q_lora_rank=None),
    "mla_qlora_groups": dict(q_lora_rank=24, n_group=4, topk_group=2, num_experts_per_tok=3,
                             routed_scaling_factor=2.5),
    "yarn_unnormalised_tied": dict(q_lora_rank=24, norm_topk_prob=False, n_shared_experts=2, tie_word_embeddings=True,
                                   rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                     beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.7)),
    "all_dense": dict(q_lora_rank=None, first_k_dense_replace=3, num_hidden_layers=3),
}  # fmt: skip


def _model(case: str) -> KimiForCausalLM:
    torch.manual_seed(0)
    model = KimiForCausalLM(load_model_config("tiny", **{**BASE, **CASES[case]})).eval()
    # A non-zero router bias so the test sees that it selects (and does not weight).
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("case,rope_interleave", [
    ("mla_no_qlora", False), ("mla_no_qlora", True), ("mla_qlora_groups", True),
    ("yarn_unnormalised_tied", False), ("all_dense", True),
])  # fmt: skip
def test_transformers_logits_match(case, rope_interleave, tmp_path):
    model = _model(case)
    ids_BT = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_BTV = model(ids_BT)
    export(model, tmp_path, rope_interleave=rope_interleave)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        hf_BTV = hf(ids_BT).logits
    assert (hf_BTV - ours_BTV).abs().max().item() < 1e-4

    back = load(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(ids_BT), ours_BTV)


def test_export_command_reexports_and_fails_in_one_line(tmp_path, capsys):
    from kimi_train.tools.hf import main

    model = _model("mla_no_qlora")
    export(model, tmp_path / "a")
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--rope-interleave"])
    assert '"exported"' in capsys.readouterr().out
    ids_BT = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "b")(ids_BT), model(ids_BT))
    for src in [tmp_path / "missing", tmp_path / "empty"]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as info:
            main([str(src), str(tmp_path / "c")])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kimi-train-export: ") and "\n" not in err


def test_gqa_models_do_not_export(tmp_path):
    model = KimiForCausalLM(load_model_config("tiny", attention_type="gqa", num_hidden_layers=1))
    with pytest.raises(ValueError, match="model.attention_type='gqa'"):
        export(model, tmp_path)


def test_export_command_from_a_training_run_dir(tmp_path, capsys):
    checkpoint = pytest.importorskip("kimi_train.loop.checkpoint")
    from omegaconf import OmegaConf

    import optim
    from kimi_train.parallel.fsdp_engine import FSDP2State
    from kimi_train.tools.hf import main

    model = _model("mla_qlora_groups")
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"model": model.config.to_dict()}), run / "config.yaml")
    opt = optim.Muon(optim.muon_param_groups(model))
    checkpoint.save_checkpoint(run, 3, FSDP2State(model, opt), trainer_state={}, keep=1)
    main([str(run), str(tmp_path / "hf")])
    capsys.readouterr()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids_BT = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (hf(ids_BT).logits - model(ids_BT)).abs().max().item() < 1e-4


def test_load_reads_transformers_saved_and_fused_expert_layouts(tmp_path):
    from kimi_train.tools.hf import from_hf_state_dict, to_hf_state_dict

    model = _model("mla_qlora_groups")
    export(model, tmp_path / "ours", rope_interleave=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    hf.save_pretrained(str(tmp_path / "theirs"))  # transformers' own writer, interleaved rope
    ids_BT = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "theirs")(ids_BT), model(ids_BT))

    # transformers' in-memory layout: experts fused as gate_up_proj [E, 2I, D].
    sd = to_hf_state_dict(model)
    for i in range(1, model.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        E = model.config.n_routed_experts
        gate = torch.stack([sd.pop(f"{p}.{j}.gate_proj.weight") for j in range(E)])
        up = torch.stack([sd.pop(f"{p}.{j}.up_proj.weight") for j in range(E)])
        sd[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{j}.down_proj.weight") for j in range(E)])
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("tokens_per_expert")}
    back = from_hf_state_dict(sd, model.config, rope_interleave=False)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
