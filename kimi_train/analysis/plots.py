"""`kimi-train-plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG plots from metrics.jsonl.

Writes loss.png (train, and val as markers; the corpus unigram entropy dashed),
max_logit.png (max attention logit per layer over steps, tau dashed when QK-Clip is on),
clipped_heads.png, expert_load.png (max/mean routed-token load of each MoE layer, labelled by
its model layer index, as max_logit.png's layers are) and lr.png.
Several runs overlay in one figure each, one colour per run. One run: plots go to
RUN_DIR/plots; several: to --out (default ./plots).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kimi_train.errors import UserError  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir!s} has no metrics.jsonl; pass the directory of a kimi-train run")
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror}") from None
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _float(v: Any) -> float:
    return float(v) if v is not None else float("nan")  # "inf"/"nan" strings included


def moe_layer_ids(model_cfg: dict) -> Optional[list[int]]:
    """The model layer index of each MoE layer, in the order of the *_per_layer MoE records
    (ModelConfig.is_moe_layer: layers from first_k_dense_replace on, when there are experts);
    None when the config does not say."""
    try:
        layers, first_dense = int(model_cfg["num_hidden_layers"]), int(model_cfg.get("first_k_dense_replace", 0))
        experts = int(model_cfg.get("n_routed_experts", 0))
    except (KeyError, TypeError, ValueError):
        return None
    return [i for i in range(layers) if i >= first_dense and experts > 0]


def _run_info(run_dir: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"label": run_dir.name, "tau": None, "entropy": None, "moe_layers": None}
    summary = run_dir / "summary.json"
    if summary.is_file():
        info["entropy"] = json.loads(summary.read_text()).get("unigram_entropy")
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(cfg_file))
        optim = cfg.get("optim") or {}
        if optim.get("name") == "muonclip" and (optim.get("qk_clip") or {}).get("enabled", False):
            info["tau"] = float(optim["qk_clip"]["tau"])
        if isinstance(cfg.get("model"), dict):
            info["moe_layers"] = moe_layer_ids(cfg["model"])
    return info


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], _float(r[key])) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _per_layer(records: list[dict], key: str) -> tuple[list[int], list[list[float]]]:
    rows = [r for r in records if r.get(key)]
    if not rows:
        return [], []
    n = max(len(r[key]) for r in rows)
    steps = [r["step"] for r in rows]
    layers = [[_float(r[key][i]) if i < len(r[key]) else float("nan") for r in rows] for i in range(n)]
    return steps, layers


def _layer_style(run_color: str, i: int, n_layers: int, n_runs: int, layer_label: str, run_label: str) -> dict:
    """One run: a colour per layer. Several: the run's colour, layers told apart by shade."""
    if n_runs == 1:
        return {"color": plt.get_cmap("viridis")(i / max(n_layers - 1, 1)), "label": layer_label}
    return {"color": run_color, "alpha": 0.35 + 0.65 * (i + 1) / n_layers, "label": run_label if i == 0 else None}


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write the PNGs for one or several runs into out_dir; returns their paths."""
    from kimi_train.fs import writable_dir

    out_dir = writable_dir(out_dir, "plots directory")
    runs = [(Path(d), read_metrics(d), _run_info(Path(d))) for d in run_dirs]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def figure(name: str, title: str, ylabel: str, draw, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, (run_dir, records, info) in enumerate(runs):
            draw(ax, records, info, colors[i % len(colors)], info["label"])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def loss(ax, records, info, c, label):
        ax.plot(*_series(records, "loss"), color=c, label=f"{label} train")
        steps, val = _series(records, "val_loss")
        if steps:
            ax.plot(steps, val, "o--", color=c, label=f"{label} val")
        if info["entropy"]:
            ax.axhline(info["entropy"], color=c, ls=":", lw=1, label=f"{label} unigram entropy")

    def max_logit(ax, records, info, c, label):
        steps, layers = _per_layer(records, "max_logit_per_layer")
        for i, ys in enumerate(layers):
            ax.plot(steps, ys, lw=1, **_layer_style(c, i, len(layers), len(runs), f"{label} layer {i}", label))
        if info["tau"]:
            ax.axhline(info["tau"], color=c, ls="--", lw=1.5, label=f"{label} tau={info['tau']:g}")

    def clipped(ax, records, info, c, label):
        ax.plot(*_series(records, "clipped_heads"), color=c, label=label)

    def load(ax, records, info, c, label):
        steps, layers = _per_layer(records, "expert_load_imbalance_per_layer")
        ids = info["moe_layers"] if info["moe_layers"] and len(info["moe_layers"]) == len(layers) else None
        for i, ys in enumerate(layers):
            name = f"layer {ids[i]}" if ids else f"MoE layer {i}"  # without a config: counted over MoE layers
            ax.plot(steps, ys, lw=1, **_layer_style(c, i, len(layers), len(runs), f"{label} {name}", label))
        ax.axhline(1.0, color="gray", ls=":", lw=1)

    def lr(ax, records, info, c, label):
        ax.plot(*_series(records, "lr"), color=c, label=label)

    figure("loss", "training loss (nats/token)", "loss", loss)
    figure("max_logit", "max attention logit per layer", "max logit", max_logit)
    figure("clipped_heads", "attention heads clipped by QK-Clip (logged steps)", "heads", clipped)
    figure("expert_load", "expert load imbalance (max / mean routed tokens)", "max / mean", load)
    figure("lr", "learning rate", "lr", lr)
    return written


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="kimi-train-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output directory (one run: RUN_DIR/plots; several: ./plots)")
    args = parser.parse_args(argv)
    out = args.out or (str(Path(args.run_dirs[0]) / "plots") if len(args.run_dirs) == 1 else "plots")
    try:
        paths = plot_runs(args.run_dirs, out)
    except (UserError, ValueError) as e:
        print(f"kimi-train-plot: {e}", file=sys.stderr)
        sys.exit(2)
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
