"""Per-layer MoE figures name a layer by its index in the model, as the attention figures do:
with first_k_dense_replace=1 the first MoE layer is layer 1 (plots and wandb keys alike)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from kimi_train.analysis import plots
from kimi_train.loop.metrics import MetricsLogger
from kimi_train.model.config import ModelConfig

MODEL = ModelConfig(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2)


def _run(path, model: ModelConfig | None):
    path.mkdir()
    records = [{"step": s, "loss": 5.0, "lr": 1e-3, "max_logit_per_layer": [1.0, 2.0, 3.0, 4.0],
                "expert_load_imbalance_per_layer": [1.5, 1.2]} for s in (1, 2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if model is not None:
        OmegaConf.save(OmegaConf.create({"model": model.to_dict()}), path / "config.yaml")
    return path


def _legends(monkeypatch, run_dirs, out) -> dict[str, list[str]]:
    """The legend labels of every figure plot_runs saves, by file name."""
    seen = {}
    savefig = plots.plt.Figure.savefig

    def record(fig, path, *args, **kwargs):
        legend = fig.axes[0].get_legend()
        seen[str(path).rsplit("/", 1)[-1]] = [t.get_text() for t in legend.get_texts()] if legend else []
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Figure, "savefig", record)
    plots.plot_runs(run_dirs, out)
    return seen


def test_expert_load_is_labelled_by_model_layer(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", MODEL)
    legends = _legends(monkeypatch, [run], tmp_path / "out")
    assert legends["expert_load.png"] == ["run layer 2", "run layer 3"]
    assert legends["max_logit.png"][:4] == ["run layer 0", "run layer 1", "run layer 2", "run layer 3"]


def test_without_a_config_the_moe_layers_are_counted(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", None)
    assert _legends(monkeypatch, [run], tmp_path / "out")["expert_load.png"] == ["run MoE layer 0", "run MoE layer 1"]


@pytest.mark.parametrize("overrides", [dict(first_k_dense_replace=1), dict(first_k_dense_replace=0),
                                       dict(n_routed_experts=0, first_k_dense_replace=1)])
def test_moe_layer_ids_follow_the_model(overrides):
    cfg = ModelConfig(**{**MODEL.to_dict(), **overrides})
    assert plots.moe_layer_ids(cfg.to_dict()) == [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


def test_wandb_keys_name_the_model_layer(tmp_path):
    logged = {}

    class Wandb:
        def log(self, values, step):
            logged.update(values)

        def finish(self):
            pass

    logger = MetricsLogger(tmp_path, True, 0, "disabled", config={"model": MODEL.to_dict()})
    logger._wandb = Wandb()
    logger.log({"step": 1, "loss": 5.0, "max_logit_per_layer": [1.0, 2.0, 3.0, 4.0],
                "expert_load_imbalance_per_layer": [1.5, 1.2]})
    logger.close()
    assert {k for k in logged if "/" in k} == {f"max_logit_per_layer/{i}" for i in range(4)} | {
        "expert_load_imbalance_per_layer/2", "expert_load_imbalance_per_layer/3"}
