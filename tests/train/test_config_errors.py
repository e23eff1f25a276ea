"""Bad configs end with ONE line on stderr naming the key, and exit code 2, before any work."""

import pytest

from kimi_train.train import main

from conftest import run_cli

BAD = [
    # (overrides separated by spaces, text the one-line message must contain)
    ("train.stepz=10", "Key 'stepz' not in 'TrainLoopConfig'"),
    ("+train.extra=1", "Key 'extra' not in 'TrainLoopConfig'"),
    ("train.steps=abc", "train.steps=abc"),
    ("optim=sgd", "optim='sgd' is not a known config; valid values: adamw, muon, muonclip"),
    ("model=huge", "model='huge' is not a known config; valid values:"),
    ("train.steps=0", "train.steps=0 is not valid; must be >= 1"),
    ("optim.lr=-0.1", "optim.lr=-0.1 is not valid"),
    ("optim.qk_clip.tau=0", "optim.qk_clip.tau=0.0 is not valid"),
    ("optim.ns_method=newton", "optim.ns_method='newton' is not valid; valid values: keller, polar_express, gram"),
    ("optim.ns_backend=cuda", "optim.ns_backend='cuda' is not valid; valid values: auto, torch, triton"),
    ("resume=sometimes", "resume='sometimes' is not valid; valid values: auto, never"),
    ("checkpoint.every=-1", "checkpoint.every=-1 is not valid"),
    ("train.dtype=fp8", "train.dtype='fp8' is not valid; valid values: auto, fp32, bf16"),
    ("train.activation_checkpointing=some", "train.activation_checkpointing='some' is not valid; valid values: none, selective, full"),
    ("train.recompute_moe_down_proj=true", "train.recompute_moe_down_proj=True is not valid; needs train.activation_checkpointing=selective"),
    ("schedule.type=step", "schedule.type='step' is not valid; valid values: wsd, cosine, constant"),
    ("train.global_batch_size=6", "train.global_batch_size=6 is not valid; must be a positive multiple of"),
    ("train.seq_len=100000", "train.seq_len=100000 is not valid; must be <= model.max_position_embeddings"),
    ("data.source=s3", "data.source='s3' is not valid; valid values: stdlib, files, hub"),
    ("data=files", "data.paths=[] is not valid; data.source=files needs a list of local files"),
    ("logging.wandb=maybe", "logging.wandb='maybe' is not valid; valid values: offline, online, disabled"),
    ("model.num_experts_per_tok=99", "model.num_experts_per_tok=99"),
    ("model.vocab_size=100", "model.vocab_size=100 is not valid; must be >= 256 for data.tokenizer=byte"),
    ("model.record_max_logits=false", "model.record_max_logits=False is not valid; QK-Clip needs the max logits"),
    ("optim=muon model.record_max_logits=false logging.post_step_max_logit=true",
     "logging.post_step_max_logit=True is not valid; needs model.record_max_logits=true"),
    ('optim.weight_decay=-1', 'optim.weight_decay=-1.0 is not valid; must be >= 0'),
    ('optim.momentum=1.0', 'optim.momentum=1.0 is not valid; must be in [0, 1)'),
    ('optim.ns_steps=0', 'optim.ns_steps=0 is not valid; must be >= 1'),
    ('optim.ns_dtype=int8', "optim.ns_dtype='int8' is not valid; valid values: bf16,"),
    ('optim.adjust_lr=foo', "optim.adjust_lr='foo' is not valid; valid values: match_rms_adamw, original, none"),
    ('optim.betas=[0.9]', 'optim.betas=[0.9] is not valid; must be two numbers in [0, 1)'),
    ('optim.eps=0', 'optim.eps=0.0 is not valid; must be > 0'),
    ('optim.grad_clip=-1', 'optim.grad_clip=-1.0 is not valid; must be >= 0'),
    ('optim.lr=nan', 'optim.lr=nan is not valid; must be a finite number > 0'),
    ('optim.nesterov=maybe', "Value 'maybe' is not a valid bool"),
    ('schedule.warmup_steps=-1', 'schedule.warmup_steps=-1 is not valid; must be >= 0'),
    ('schedule.decay_fraction=1.5', 'schedule.decay_fraction=1.5 is not valid; must be in [0, 1]'),
    ('schedule.min_lr_ratio=2', 'schedule.min_lr_ratio=2.0 is not valid; must be in [0, 1]'),
    ('schedule.decay_shape=step', "schedule.decay_shape='step' is not valid; valid values: cosine, linear"),
    ('data.tokenizer=sentencepiece', "data.tokenizer='sentencepiece' is not valid; valid values: byte, bpe, hf"),
    ('data.val_fraction=0', 'data.val_fraction=0.0 is not valid; must be in (0, 1)'),
    ('data.max_bytes=-1', 'data.max_bytes=-1 is not valid; must be >= 0'),
    ('data.bpe_vocab_size=100', 'data.bpe_vocab_size=100 is not valid; must be >= 260'),
    ('data=hub', 'data.name=None is not valid; data.source=hub needs a dataset name'),
    ('data.tokenizer=hf', 'data.tokenizer_path=None is not valid; data.tokenizer=hf needs a local tokenizer.json'),
    ('train.seq_len=1', 'train.seq_len=1 is not valid; must be >= 2'),
    ('train.micro_batch_size=0', 'train.micro_batch_size=0 is not valid; must be >= 1'),
    ('train.log_every=0', 'train.log_every=0 is not valid; must be >= 1'),
    ('train.val_every=-1', 'train.val_every=-1 is not valid; must be >= 0'),
    ('train.val_batches=-1', 'train.val_batches=-1 is not valid; must be >= 0'),
    ('train.max_skipped_steps=-1', 'train.max_skipped_steps=-1 is not valid; must be >= 0'),
    ('train.peak_flops=0', 'train.peak_flops=0.0 is not valid; must be > 0 or null'),
    ('train.expert_bias_rate=-1', 'train.expert_bias_rate=-1.0 is not valid; must be >= 0'),
    ('checkpoint.keep=0', 'checkpoint.keep=0 is not valid; must be >= 1'),
    ('parallel.ep=0', 'parallel.ep=0; valid: an int >= 1'),
    ('parallel.dp_shard=0', 'parallel.dp_shard=0; valid: an int >= 1, or -1 to infer'),
    ('parallel.ep=3', 'parallel.ep=3 must divide parallel.dp_shard=1'),
    ('parallel.dp_replicate=2', 'parallel.dp_replicate=2 does not divide the world size 1'),
    ('parallel.pp=2', 'parallel.pp * parallel.dp_replicate = 2 * 1 does not divide the world size 1'),
    ('parallel.pp=0', 'parallel.pp=0; valid: an int >= 1'),
    ('parallel.pp_schedule=GPipe', "parallel.pp_schedule='GPipe' is not valid; valid values: 1F1B, Interleaved1F1B"),
    ('parallel.pp_microbatches=0', 'parallel.pp_microbatches=0 is not valid; must be >= 1, or -1'),
    ('parallel.pp_microbatches=4', 'parallel.pp_microbatches=4 is not valid; needs parallel.pp > 1'),
    ('parallel.pp_schedule=Interleaved1F1B', "parallel.pp_schedule='Interleaved1F1B' is not valid; needs parallel.pp > 1"),
    ('parallel.pp_layout=[2,2]', 'parallel.pp_layout=[2, 2] is not valid; needs parallel.pp > 1'),
    ('model.n_group=3', 'model.n_group=3: must be positive and divide n_routed_experts=8'),
    ('model.topk_group=5', 'model.topk_group=5: must be in [1, n_group=1]'),
    ('model.first_k_dense_replace=99', 'model.first_k_dense_replace=99: must be in [0, num_hidden_layers=4]'),
    ('model.num_attention_heads=0', 'model.num_attention_heads=0: must be a positive integer'),
]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_and_exit_2(override, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([f"run_dir={tmp_path / 'run'}", "train.micro_batch_size=4", "logging.wandb=disabled", *override.split()])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("kimi-train: config error: ") and expected in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no work was done


def test_cli_process_exits_2_with_one_line(tmp_path):
    proc = run_cli(["train.nope=1", f"run_dir={tmp_path}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Key 'nope' not in 'TrainLoopConfig'" in proc.stderr


def test_default_config_and_every_group_option_compose_and_validate():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kimi_train.config import TrainConfig, validate
    from kimi_train.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        for overrides in ([], ["optim=muon"], ["optim=adamw"], ["model=small"]):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
            assert isinstance(cfg, TrainConfig)
            validate(cfg)
        assert cfg.optim.name == "muonclip" and cfg.train.steps == 300 and cfg.data.source == "stdlib"


def test_run_dir_and_sweep_subdir_are_deterministic(monkeypatch):
    from kimi_train.train import _run_dir, _sweep_subdir

    assert _run_dir(None, None, "tiny", "muonclip") == "runs/tiny-muonclip"
    assert _run_dir(None, "exp1", "tiny", "adamw") == "runs/exp1"
    assert _run_dir("/x/y", "exp1", "tiny", "adamw") == "/x/y"
    monkeypatch.setattr("sys.argv", ["kimi-train", "-m", "optim=muonclip,adamw", "train.steps=5", "optim.lr=1e-3,2e-3"])
    # sorted as Hydra's override_dirname sorts, whatever the order on the command line
    assert _sweep_subdir(["optim=adamw", "train.steps=5", "optim.lr=1e-3"], 3) == "optim.lr=1e-3,optim=adamw"
    assert _sweep_subdir(["optim.lr=1e-3", "train.steps=5", "optim=adamw"], 3) == "optim.lr=1e-3,optim=adamw"
    monkeypatch.setattr("sys.argv", ["kimi-train", "-m", "train.steps=5"])
    assert _sweep_subdir(["train.steps=5"], 0) == "job0"
    # Sweeps a config declares in hydra.sweeper.params count too; the command line wins for a key in both.
    params = {"optim": "muon,adamw", "train.steps": 5}
    monkeypatch.setattr("sys.argv", ["kimi-train", "-m", "--config-name", "config", "optim.lr=1e-3,2e-3"])
    assert _sweep_subdir(["optim=adamw", "optim.lr=1e-3", "train.steps=5"], 1, params) == "optim.lr=1e-3,optim=adamw"
    monkeypatch.setattr("sys.argv", ["kimi-train", "-m", "optim=muon"])
    assert _sweep_subdir(["optim=muon", "train.steps=5"], 0, params) == "job0"
    # A swept value with commas in it stays whole (the job's overrides come as a list).
    monkeypatch.setattr("sys.argv", ["kimi-train", "-m", "schedule.type=wsd,cosine", "optim.betas=[0.9,0.95]"])
    assert _sweep_subdir(["schedule.type=cosine", "optim.betas=[0.9,0.95]"], 1) == "schedule.type=cosine"
    monkeypatch.setattr("sys.argv", ["kimi-train", "-m", "optim.betas=choice([0.9,0.95],[0.8,0.9])"])
    assert _sweep_subdir(["optim.betas=[0.8,0.9]"], 1) == "optim.betas=_0.8,0.9_"
    # A launcher that runs the job in another process (sys.argv is not the kimi-train command):
    # every override names the job; a long name is cut and ends in a hash, so jobs never collide.
    monkeypatch.setattr("sys.argv", ["/usr/bin/python", "-c", "worker"])
    assert _sweep_subdir(["optim=adamw", "resume=never", "optim.lr=1e-3"], 2, params) == \
        "optim.lr=1e-3,optim=adamw,resume=never"
    long = [f"data.paths=[{'/data/' + 'x' * 300}.txt]", "run_name=exp"]
    a, b = (_sweep_subdir([*long, f"optim.lr={lr}"], 0) for lr in ("1e-3", "2e-3"))
    assert len(a) == len(b) == 200 and a != b and a[:187] == b[:187]


PIPELINE_BAD = [
    # (parallel overrides, other overrides, world size, text of the one-line message)
    ({"pp": 2, "engine": "deepspeed"}, {}, 2, "parallel.engine='deepspeed' is not valid; must be fsdp2 with parallel.pp > 1"),
    ({"pp": 2}, {"tie_word_embeddings": True}, 2, "model.tie_word_embeddings=True is not valid"),
    ({"pp": 2}, {"compile": True}, 2, "train.compile=True is not valid; is not supported with parallel.pp > 1"),
    ({"pp": 2, "pp_layout": [1, 2]}, {}, 2, "parallel.pp_layout=[1, 2] is not valid; must be layers per stage"),
    ({"pp": 2, "pp_layout": [1, 1, 1, 1]}, {}, 2, "must give pp=2 stages under 1F1B"),
    ({"pp": 2, "pp_schedule": "Interleaved1F1B", "pp_layout": [2, 2]}, {}, 2, "at least 4, under Interleaved1F1B"),
    ({"pp": 4, "pp_schedule": "Interleaved1F1B"}, {}, 4, "gives 8 stages (Interleaved1F1B) but the model has 4 layers"),
    ({"pp": 2, "pp_microbatches": 1}, {}, 2, "parallel.pp_microbatches=1 is not valid; must be >= pp=2 under 1F1B"),
    ({"pp": 2, "pp_microbatches": 3}, {"global_batch_size": 8}, 2,
     "parallel.pp_microbatches=3 is not valid; must equal train.global_batch_size / (micro_batch_size * dp) = 8 / (2 * 1) = 4"),
    ({"pp": 2}, {"global_batch_size": 2}, 2, "parallel.pp_microbatches=1 is not valid; must be >= pp=2 under 1F1B"),
]


@pytest.mark.parametrize("parallel,other,world,expected", PIPELINE_BAD, ids=[b[3][:40] for b in PIPELINE_BAD])
def test_pipeline_config_errors_name_the_key(parallel, other, world, expected):
    """The pp > 1 checks need a world size of several ranks: validate() with the data-parallel size."""
    import dataclasses

    from kimi_train.config import ConfigError, ParallelConfig, TrainConfig, TrainLoopConfig, validate
    from kimi_train.model import load_model_config

    model = load_model_config("tiny", **{k: v for k, v in other.items() if k == "tie_word_embeddings"})
    train = TrainLoopConfig(micro_batch_size=2, **{k: v for k, v in other.items() if k in ("global_batch_size", "compile")})
    cfg = TrainConfig(model=model, train=train, parallel=ParallelConfig(**parallel))
    with pytest.raises(ConfigError) as e:
        validate(cfg, dp_size=world // parallel["pp"])
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    ok = dataclasses.replace(cfg, parallel=ParallelConfig(pp=2), model=load_model_config("tiny"),
                             train=TrainLoopConfig(micro_batch_size=2))
    assert validate(ok, dp_size=1) is ok  # pp=2 with the defaults: 2 micro-batches of 2
