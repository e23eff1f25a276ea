"""The experiment configs compose (Hydra compose API), validate, and set what docs/stability.md says."""

from __future__ import annotations

import itertools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import kimi_train.train  # noqa: F401  (registers the schemas and resolvers config.yaml uses)
from kimi_train.config import TrainConfig, validate
from kimi_train.train import CONFIG_DIR

EXPERIMENTS = ["qk_clip_stability", "lr_sensitivity",
               "muon_vs_adamw"]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        yield


def _compose(overrides: list[str], hydra: bool = False):
    return compose("config", overrides=overrides, return_hydra_config=hydra)


def _sweep(experiment: str) -> dict[str, list[str]]:
    params = _compose([f"experiment={experiment}"], hydra=True).hydra.sweeper.params
    return {k: str(v).split(",") for k, v in params.items()}


def _jobs(experiment: str) -> list[list[str]]:
    """The override lists of the experiment's multirun jobs (of an lr grid: its two ends, to keep it quick)."""
    sweep = _sweep(experiment)
    if "optim.lr" in sweep:
        sweep["optim.lr"] = [sweep["optim.lr"][0], sweep["optim.lr"][-1]]
    keys = list(sweep)
    return [[f"experiment={experiment}", *(f"{k}={v}" for k, v in zip(keys, vals))]
            for vals in itertools.product(*(sweep[k] for k in keys))]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_composes_and_validates(experiment):
    jobs = _jobs(experiment)
    assert len(jobs) >= 2
    for overrides in jobs:
        cfg = OmegaConf.to_object(_compose(overrides))
        assert isinstance(cfg, TrainConfig)
        validate(cfg)
        assert cfg.run_name == experiment  # runs/<experiment>/<job overrides>
        assert cfg.train.log_every == 1  # per-step max logit and exact clip counts
        assert cfg.logging.wandb == "disabled"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_job_dirnames_are_the_swept_values(experiment):
    subdir = str(OmegaConf.to_container(_compose([f"experiment={experiment}"], hydra=True).hydra.sweep)["subdir"])
    assert "runtime.choices.optim" in subdir  # every experiment sweeps the optimizer
    assert ("optim.lr" in subdir) == ("optim.lr" in _sweep(experiment))


def test_qk_clip_stability_sets_what_it_claims():
    assert _sweep("qk_clip_stability") == {"optim": ["muon", "muonclip"]}
    muon = OmegaConf.to_object(_compose(["experiment=qk_clip_stability", "optim=muon"]))
    clip = OmegaConf.to_object(_compose(["experiment=qk_clip_stability", "optim=muonclip"]))
    assert (muon.optim.name, muon.optim.qk_clip.enabled) == ("muon", False)
    assert (clip.optim.name, clip.optim.qk_clip.enabled, clip.optim.qk_clip.tau) == ("muonclip", True, 30.0)
    # The two arms differ only in the optimizer: same model, data, seed, schedule and lr.
    for part in ("model", "data", "train", "schedule"):
        assert getattr(muon, part) == getattr(clip, part), part
    assert muon.optim.lr == clip.optim.lr == 0.05
    assert muon.model.num_hidden_layers == 4 and muon.data.tokenizer == "byte"
    assert muon.train.steps == 300


def test_lr_sweeps_cover_every_optimizer_and_share_settings():
    lr_sweep, comparison = _sweep("lr_sensitivity"), _sweep("muon_vs_adamw")
    for sweep in (lr_sweep, comparison):
        assert sorted(sweep["optim"]) == ["adamw", "muon", "muonclip"]
    assert len(lr_sweep["optim.lr"]) >= 5
    assert len(comparison["optim.lr"]) >= 3
    # muon_vs_adamw's runs are a subset of lr_sensitivity's (docs/stability.md relies on it).
    assert set(comparison["optim.lr"]) <= set(lr_sweep["optim.lr"])
    for optimizer, lr in zip(comparison["optim"], comparison["optim.lr"]):
        a = OmegaConf.to_object(_compose(["experiment=lr_sensitivity", f"optim={optimizer}", f"optim.lr={lr}"]))
        b = OmegaConf.to_object(_compose(["experiment=muon_vs_adamw", f"optim={optimizer}", f"optim.lr={lr}"]))
        a.run_name = b.run_name = None
        assert a == b, (optimizer, lr)
    # Constant lr after warmup: a loss curve can be read at any step (steps-to-target).
    assert a.schedule.type == "constant"
