"""ModelConfig validation and named configs."""

import pytest
from omegaconf import OmegaConf

from kimi_train.model import ModelConfig, load_model_config

BAD = [
    (dict(vocab_size=0), "model.vocab_size=0"),
    (dict(hidden_size=-8), "model.hidden_size=-8"),
    (dict(num_hidden_layers=0), "model.num_hidden_layers=0"),
    (dict(attention_type="mqa"), "model.attention_type='mqa'"),
    (dict(kv_lora_rank=0), "model.kv_lora_rank=0"),
    (dict(q_lora_rank=0), "model.q_lora_rank=0"),
    (dict(qk_rope_head_dim=7), "model.qk_rope_head_dim=7"),
    (dict(attention_type="gqa", num_key_value_heads=3), "model.num_key_value_heads=3"),
    (dict(attention_type="gqa", hidden_size=130), "model.num_attention_heads=4"),
    (dict(first_k_dense_replace=5), "model.first_k_dense_replace=5"),
    (dict(num_experts_per_tok=9), "model.num_experts_per_tok=9"),
    (dict(num_experts_per_tok=0), "model.num_experts_per_tok=0"),
    (dict(n_group=3), "model.n_group=3"),
    (dict(n_group=2, topk_group=3), "model.topk_group=3"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "model.num_experts_per_tok=3"),
    (dict(moe_intermediate_size=0), "model.moe_intermediate_size=0"),
    (dict(routed_scaling_factor=0.0), "model.routed_scaling_factor=0.0"),
    (dict(rope_theta=0.0), "model.rope_theta=0.0"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "model.rope_scaling="),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(init_std=0.0), "model.init_std=0.0"),
    (dict(max_logits_chunk=0), "model.max_logits_chunk=0"),
    (dict(loss_chunk_tokens=-1), "model.loss_chunk_tokens=-1"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[str(next(iter(o))) + "-" + str(i) for i, (o, _) in enumerate(BAD)])
def test_bad_config_fails_with_one_line_naming_the_field(overrides, needle):
    with pytest.raises(ValueError) as info:
        load_model_config("tiny", **overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("name", ["tiny", "small", "k2_mini", "k2"])
def test_named_configs_load_and_validate(name):
    cfg = load_model_config(name)
    assert isinstance(cfg, ModelConfig)
    assert cfg.attention_type == "mla"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model config 'nope'; valid: k2, k2_mini, small, tiny"):
        load_model_config("nope")


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="hidden_sizee"):
        load_model_config("tiny", hidden_sizee=3)


def test_config_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("hidden_size: 64\nnum_attention_heads: 2\n")
    monkeypatch.setenv("KIMI_TRAIN_CONFIG_DIR", str(tmp_path))
    cfg = load_model_config("mine")
    assert cfg.hidden_size == 64 and cfg.num_attention_heads == 2


def test_is_an_omegaconf_schema():
    # The trainer registers ModelConfig as a structured-config schema: it must round-trip.
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create(load_model_config("k2").to_dict()))
    assert merged.rope_scaling.factor == 32.0 and merged.q_lora_rank == 1536
    with pytest.raises(Exception):
        OmegaConf.merge(schema, {"hidden_size": "wide"})
