"""Activation memory per token, per layer kind and per mode, counted (kimi_train.memory.counter).

    python benchmarks/activation_memory_bench.py                          # k2_mini at seq 1024 (the issue's)
    python benchmarks/activation_memory_bench.py --models tiny,small,k2_mini --seq 256,1024 --json out.json

For each model config and sequence length, one sequence (batch 1), fp32 on CPU, it counts the
storages a forward leaves alive for its backward (parameters excluded):

    dense layer, MoE layer   one decoder layer of each kind, under train.activation_checkpointing
                             none | selective | selective + train.recompute_moe_down_proj | full
                             (the layer's input counts when the layer keeps it)
    logits path              final norm -> lm_head -> cross-entropy: the model's chunked loss
                             (model.loss_chunk_tokens, 1024 where the config's is 0) against
                             the plain F.cross_entropy over the full logits

and, where kimi_train.memory.planner is importable, the planner's figure for the same shapes
beside it. Prints a table and, with --json, writes the figures. Counting is exact and
deterministic: the figures do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

from kimi_train.memory.counter import count_activations
from kimi_train.model import KimiForCausalLM, load_model_config
from kimi_train.parallel.activation_checkpoint import apply_activation_checkpointing

CHUNK = 1024  # tokens per chunk of the chunked loss where model.loss_chunk_tokens is 0 (plain)
MODES = (("none", False), ("selective", False), ("selective", True), ("full", False))


def mode_name(mode: str, down: bool) -> str:
    return mode + ("+down" if down else "")


def count_layers(name: str, seq: int) -> dict[str, dict[str, float]]:
    """bytes per token: {layer kind: {mode: bytes}}, counted on a 2-layer model (dense, then MoE)."""
    out: dict[str, dict[str, float]] = {"dense layer": {}, "MoE layer": {}}
    cfg = load_model_config(name, num_hidden_layers=2, first_k_dense_replace=1)
    for mode, down in MODES:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = KimiForCausalLM(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        apply_activation_checkpointing(model, mode, down).train()
        cos, sin = model.model.rotary_emb(torch.arange(seq), torch.float32)
        for kind, layer in zip(out, model.model.layers):
            # The input requires grad and is made inside the counter, as a layer's input is in a model.
            x = torch.randn(1, seq, cfg.hidden_size, requires_grad=True)
            counted = count_activations(lambda x: layer(x.clone(), cos, sin), x, module=model)
            out[kind][mode_name(mode, down)] = counted.bytes / seq
            layer.mlp.reset_counts() if hasattr(layer.mlp, "reset_counts") else None
    return out


def count_logits_path(name: str, seq: int) -> dict[str, float]:
    """bytes per token of final norm -> lm_head -> loss: the model's chunked loss and the plain one."""
    cfg = load_model_config(name, num_hidden_layers=1, first_k_dense_replace=1)
    torch.manual_seed(0)
    model = KimiForCausalLM(cfg).train()
    h = torch.randn(1, seq, cfg.hidden_size, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (1, seq))

    def plain(h):
        logits = model.lm_head(model.model.norm(h.clone()))
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    out = {"plain": count_activations(plain, h, module=model).bytes / seq}
    model.lm_head.loss_chunk_tokens = cfg.loss_chunk_tokens or CHUNK  # as the planner's table
    out["chunked"] = count_activations(lambda h: model.lm_head(model.model.norm(h.clone()), labels), h,
                                       module=model).bytes / seq
    return out


def planned(name: str, seq: int) -> dict | None:
    try:
        from kimi_train.memory import planner
    except ImportError:
        return None
    return planner.per_token_table(load_model_config(name), seq)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="k2_mini")
    p.add_argument("--seq", default="1024", help="comma-separated sequence lengths")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    report = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
              "results": []}
    print("| model | seq | layer kind | mode | KB/token counted | vs none | planner KB/token |\n"
          "|---|---:|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        for seq in map(int, args.seq.split(",")):
            layers, logits = count_layers(name, seq), count_logits_path(name, seq)
            row = {"model": name, "seq": seq, "layers": layers, "logits_path": logits}
            plan = planned(name, seq)
            if plan is not None:
                row["planner"] = plan
            report["results"].append(row)
            planned_kb = lambda kind, mode: f"{plan[kind][mode] / 1024:.1f}" if plan else "-"  # noqa: E731
            for kind, by_mode in layers.items():
                for mode, b in by_mode.items():
                    print(f"| {name} | {seq} | {kind} | {mode} | {b / 1024:.1f} | {b / by_mode['none']:.3f}x | "
                          f"{planned_kb(kind, mode)} |")
            for mode, b in logits.items():
                print(f"| {name} | {seq} | logits path | {mode} | {b / 1024:.1f} | {b / logits['plain']:.3f}x | "
                      f"{planned_kb('logits path', mode)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
