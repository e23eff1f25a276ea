"""kimi-train-inspect: parameter counts and per-rank memory of a model config, without allocating it.

    kimi-train-inspect model=k2 parallel.dp_shard=256 parallel.ep=32 dtype=bf16
    kimi-train-inspect model=tiny model.num_hidden_layers=8 optimizer=adamw
    kimi-train-inspect world_size=16 gpus_per_node=8 parallel.ep=8 model=k2_mini     # a launch's dry run
    kimi-train-inspect model=k2 parallel.dp_shard=256 parallel.ep=16 dtype=bf16 train.seq_len=4096 --gpu-mem 80GiB

Arguments (key=value, any order):
    model=NAME|PATH.yaml             configs/model/NAME.yaml (default tiny)
    model.FIELD=VALUE                any ModelConfig field, type-checked (e.g. model.n_routed_experts=64)
    parallel.dp_replicate=R          HSDP replicas (default 1)
    parallel.dp_shard=S              FSDP shards (default 1); experts are sharded over ep, then dp_shard/ep
    parallel.ep=P                    expert parallel degree (divides dp_shard and n_routed_experts)
    dtype=fp32|bf16                  parameter/gradient dtype; bf16 adds fp32 master weights
    optimizer=muon|adamw             muon: 1 fp32 buffer per hidden matrix, AdamW (2) for the rest
    world_size=N gpus_per_node=G     dry run of a launch on N ranks, G per node: validates the layout as
                                     kimi-train does (parallel.dp_shard defaults to -1, inferred), then
                                     prints each rank's node, local rank and mesh coordinates, the EP
                                     groups and the per-rank memory as a table (json=true: JSON)
  Activations (per rank, one micro-batch; kimi_train.memory.planner):
    train.seq_len=T                  tokens per sequence (default: the training config's)
    train.micro_batch_size=B         sequences per micro-batch on each rank (default: the training config's)
    train.activation_checkpointing=none|selective|full
    train.recompute_moe_down_proj=true|false   selective only: recompute the routed experts' down projection
    moe_imbalance=M                  under EP the most loaded rank receives (1 + M) x the balanced routed
                                     slots (default 0)
    --gpu-mem SIZE (gpu_mem=SIZE)    e.g. 80GiB or 80GB: a table per checkpointing mode of the activations
                                     and the largest micro-batch that fits beside parameters, gradients and
                                     optimizer state (json=true: JSON)

The model is built on the meta device (no memory), so model=k2 answers in a second. Memory is
per rank and counts parameters, gradients, master weights and optimizer state (FSDP2-style:
each tensor sharded along dim 0, the largest rank's share). Activations are counted from shapes
(the planner's inventory, checked against the activation counter): "kept" is what the forward
leaves for the backward, "peak" adds the largest transient of the backward (one layer's
recomputation, or the loss's gradient). dtype=bf16 means bf16 autocast, and with more than one
rank FSDP2's bf16 mixed precision (a bf16 residual stream). Pipeline parallelism is not built:
every rank holds all layers (a pipeline stage would hold its share of them).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kimi_train.config import TrainLoopConfig
from kimi_train.memory.planner import MODES, plan_activations
from kimi_train.model import KimiForCausalLM, ModelConfig, load_model_config
from kimi_train.model.config import model_config_from_dict

COMPONENTS = ["embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "lm_head"]
MUON_COMPONENTS = {"attention", "dense_mlp", "routed_experts", "shared_experts", "router"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
SIZE_UNITS = {"TiB": 2**40, "GiB": 2**30, "MiB": 2**20, "TB": 10**12, "GB": 10**9, "MB": 10**6}


def component_of(name: str) -> str:
    """Which COMPONENTS bucket a parameter name belongs to."""
    if name.endswith("norm.weight"):
        return "norms"  # input/post-attention/final norms and MLA's latent norms
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"unclassified parameter {name}")


def _sharded_numel(shape: torch.Size, shards: int) -> int:
    """Elements on the largest rank when dim 0 is split into `shards` (FSDP2 pads the last ones)."""
    if len(shape) == 0:
        return 1
    rest = 1
    for d in shape[1:]:
        rest *= d
    return -(-shape[0] // shards) * rest


def inspect(
    cfg: ModelConfig, dp_replicate: int = 1, dp_shard: int = 1, ep: int = 1, dtype: str = "fp32",
    optimizer: str = "muon", seq_len: Optional[int] = None, micro_batch_size: Optional[int] = None,
    activation_checkpointing: str = "none", recompute_moe_down_proj: bool = False, moe_imbalance: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Counts and per-rank memory as a JSON-able dict (see the module docstring)."""
    for name, v in (("parallel.dp_replicate", dp_replicate), ("parallel.dp_shard", dp_shard), ("parallel.ep", ep)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    if dp_shard % ep:
        raise ValueError(f"parallel.ep={ep}: must divide parallel.dp_shard={dp_shard} (experts shard over ep, then dp_shard/ep)")
    if cfg.n_routed_experts and cfg.n_routed_experts % ep:
        raise ValueError(f"parallel.ep={ep}: must divide model.n_routed_experts={cfg.n_routed_experts}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"optimizer={optimizer!r}; valid: muon, adamw")

    with torch.device("meta"):
        model = KimiForCausalLM(cfg)
    counts = dict.fromkeys(COMPONENTS, 0)
    per_rank = {"muon": 0, "adamw": 0}
    for name, p in model.named_parameters():
        comp = component_of(name)
        counts[comp] += p.numel()
        if comp == "routed_experts":  # [E, out, in]: E/ep experts per EP rank, then FSDP over dp_shard/ep
            local = torch.Size([p.shape[0] // ep, *p.shape[1:]])
            n = _sharded_numel(local, dp_shard // ep)
        else:
            n = _sharded_numel(p.shape, dp_shard)
        per_rank["muon" if optimizer == "muon" and comp in MUON_COMPONENTS and p.dim() >= 2 else "adamw"] += n
    total = sum(counts.values())
    routed = counts["routed_experts"]
    activated = total - routed
    if cfg.n_routed_experts:
        activated += routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))

    numel = per_rank["muon"] + per_rank["adamw"]
    width = DTYPE_BYTES[dtype]
    memory = {
        "params": numel * width,
        "master_params_fp32": numel * 4 if dtype == "bf16" else 0,
        "grads": numel * width,
        "optimizer_state": per_rank["muon"] * 4 + per_rank["adamw"] * 8,
    }
    memory["total"] = sum(memory.values())
    activations = activations_per_rank(
        cfg, seq_len, micro_batch_size, activation_checkpointing, dtype=dtype, bf16_params=dp_replicate * dp_shard > 1,
        ep=ep, imbalance=moe_imbalance, recompute_moe_down_proj=recompute_moe_down_proj)  # fmt: skip
    return {
        "total_params": total,
        "activated_params": activated,
        "components": counts,
        "router_bias_buffers": buffers,
        "layout": {
            "world_size": dp_replicate * dp_shard, "dp_replicate": dp_replicate, "dp_shard": dp_shard, "ep": ep,
            "dtype": dtype, "optimizer": optimizer,
        },  # fmt: skip
        "per_rank": {
            "params": numel,
            "muon_params": per_rank["muon"],
            "adamw_params": per_rank["adamw"],
            "memory_bytes": memory,
            "memory_gib": {k: round(v / 2**30, 3) for k, v in memory.items()},
        },
        "activations": activations,
    }


def activations_per_rank(cfg: ModelConfig, seq_len: Optional[int], micro_batch_size: Optional[int], mode: str,
                         **kwargs: Any) -> dict[str, Any]:
    """The planner's figures for one micro-batch on one rank (defaults: the training config's)."""
    seq_len = TrainLoopConfig.seq_len if seq_len is None else seq_len
    micro_batch_size = TrainLoopConfig.micro_batch_size if micro_batch_size is None else micro_batch_size
    for key, v in (("train.seq_len", seq_len), ("train.micro_batch_size", micro_batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r}: must be a positive integer")
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}; valid: {', '.join(MODES)}")
    if kwargs.get("recompute_moe_down_proj") and mode != "selective":  # as the training config's check
        raise ValueError("train.recompute_moe_down_proj=True needs train.activation_checkpointing=selective "
                         "(full recomputes it already)")
    plan = plan_activations(cfg, seq_len, micro_batch_size, mode, **kwargs)
    return {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "activation_checkpointing": mode,
            "recompute_moe_down_proj": kwargs.get("recompute_moe_down_proj", False),
            "moe_imbalance": kwargs.get("imbalance", 0.0), **plan.to_dict(),
            "kept_gib": round(plan.kept_bytes / 2**30, 3), "peak_gib": round(plan.peak_bytes / 2**30, 3)}


def parse_size(text: str) -> int:
    """'80GiB' -> bytes (units TiB GiB MiB, TB GB MB)."""
    for unit, scale in SIZE_UNITS.items():
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * scale)
            break
    raise ValueError(f"--gpu-mem={text!r}: expected a positive size with a unit, e.g. 80GiB or 80GB "
                     f"(units {', '.join(SIZE_UNITS)})")


def fit_table(cfg: ModelConfig, report: dict[str, Any], gpu_mem: int, recompute_moe_down_proj: bool = False,
              moe_imbalance: float = 0.0) -> list[dict[str, Any]]:
    """Per checkpointing mode: the activations of the report's micro-batch and the largest micro-batch
    whose peak activations fit in ``gpu_mem`` beside the report's per-rank parameters, gradients and
    optimizer state (0: not even one sequence)."""
    lay, act = report["layout"], report["activations"]
    state = report["per_rank"]["memory_bytes"]["total"]
    kw = dict(dtype=lay["dtype"], bf16_params=lay["world_size"] > 1, ep=lay["ep"], imbalance=moe_imbalance,
              recompute_moe_down_proj=recompute_moe_down_proj)
    rows = []
    for mode in MODES:
        plan = plan_activations(cfg, act["seq_len"], act["micro_batch_size"], mode, **kw)
        one = plan_activations(cfg, act["seq_len"], 1, mode, **kw).peak_bytes
        best, step = 0, 1  # peak bytes grow linearly with the micro-batch: double, then bisect
        while state + plan_activations(cfg, act["seq_len"], best + step, mode, **kw).peak_bytes <= gpu_mem:
            best, step = best + step, step * 2
            if best > 1 << 24:
                break
        while step > 1:
            step //= 2
            if state + plan_activations(cfg, act["seq_len"], best + step, mode, **kw).peak_bytes <= gpu_mem:
                best += step
        rows.append({"mode": mode, **plan.to_dict(), "peak_bytes_per_sequence": one, "max_micro_batch": best})
    return rows


def format_fit_table(report: dict[str, Any], rows: list[dict[str, Any]], gpu_mem: int, num_layers: int) -> str:
    """The fit table as text."""
    lay, act, mem = report["layout"], report["activations"], report["per_rank"]["memory_gib"]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [f"{report['total_params']:,} parameters; per rank (world {lay['world_size']}: dp_replicate "
             f"{lay['dp_replicate']} x dp_shard {lay['dp_shard']}, ep {lay['ep']}, {lay['dtype']}, {lay['optimizer']}): "
             f"params + grads + master + optimizer state {mem['total']} GiB",
             f"activations per rank for micro-batch {act['micro_batch_size']} x seq {act['seq_len']} "
             f"(moe_imbalance {act['moe_imbalance']}{', selective recomputes the MoE down projection' if act['recompute_moe_down_proj'] else ''}; "
             "KB per token: one layer of each kind, and the logits path):",
             "mode        dense KB/tok  moe KB/tok  logits KB/tok    kept GiB    peak GiB   max micro-batch in "
             f"{gpu_mem / 2**30:g} GiB"]
    for r in rows:
        per_tok = r["per_layer_bytes_per_token"]
        kb = lambda k: f"{per_tok[k] / 1000:.1f}" if k in per_tok else "-"  # noqa: E731
        lines.append(f"{r['mode']:<10} {kb('dense'):>13} {kb('moe'):>11} {kb('logits'):>14} "
                     f"{gib(r['kept_bytes']):>11} {gib(r['peak_bytes']):>11}   {r['max_micro_batch']:>6}")
    lines.append(f"peak = kept + one layer's recomputation (selective, full) or the loss's gradient, whichever is "
                 f"larger; every rank holds all {num_layers} layers (a pipeline stage would hold its share)")
    return "\n".join(lines)


def rank_table(world_size: int, gpus_per_node: int, dp_replicate: int, dp_shard: int, ep: int) -> list[dict[str, int]]:
    """Where each global rank sits: its (node, local rank) under torchrun (consecutive ranks per node)
    and its coordinates in the ("dp_replicate", "efsdp", "ep") mesh kimi_train.parallel.dims builds."""
    rows = []
    for rank in range(world_size):
        shard = rank % dp_shard
        rows.append({"rank": rank, "node": rank // gpus_per_node, "local_rank": rank % gpus_per_node,
                     "dp_replicate": rank // dp_shard, "dp_shard": shard, "efsdp": shard // ep, "ep": shard % ep})
    return rows


def dry_run(cfg: ModelConfig, world_size: int, gpus_per_node: int, parallel: dict[str, int],
            **kwargs: Any) -> dict[str, Any]:
    """Validate a launch of ``world_size`` ranks (``gpus_per_node`` per node) as kimi-train would, then
    inspect() it and add the rank table and EP groups. Raises ValueError (one line) for a bad layout."""
    from kimi_train.parallel.dims import ParallelDims

    for key, v in (("world_size", world_size), ("gpus_per_node", gpus_per_node)):
        if v < 1:
            raise ValueError(f"{key}={v}: must be a positive integer")
    if world_size % gpus_per_node:
        raise ValueError(f"world_size={world_size} is not a multiple of gpus_per_node={gpus_per_node} "
                         "(torchrun starts the same number of ranks on every node)")
    dims = ParallelDims.from_config({"dp_shard": -1, **parallel}, world_size, cfg)  # LayoutError: one line
    report = inspect(cfg, dims.dp_replicate, dims.dp_shard, dims.ep, **kwargs)
    ranks = rank_table(world_size, gpus_per_node, dims.dp_replicate, dims.dp_shard, dims.ep)
    groups = [list(range(start, start + dims.ep)) for start in range(0, world_size, dims.ep)]
    report["layout"].update(nodes=world_size // gpus_per_node, gpus_per_node=gpus_per_node, efsdp=dims.efsdp)
    report["ranks"] = ranks
    report["ep_groups"] = groups
    report["ep_groups_cross_nodes"] = dims.ep > gpus_per_node  # the token all-to-all leaves the node
    return report


def format_dry_run(report: dict[str, Any]) -> str:
    """The dry run as text: the layout, one line per rank, the EP groups, per-rank memory."""
    lay, mem = report["layout"], report["per_rank"]["memory_gib"]
    lines = [f"{lay['world_size']} ranks on {lay['nodes']} nodes x {lay['gpus_per_node']}: dp_replicate "
             f"{lay['dp_replicate']} x dp_shard {lay['dp_shard']} (efsdp {lay['efsdp']} x ep {lay['ep']}); "
             f"{report['total_params']:,} parameters ({report['activated_params']:,} activated)",
             "rank  node  local_rank  dp_replicate  dp_shard  efsdp  ep"]
    for r in report["ranks"]:
        lines.append(f"{r['rank']:>4}  {r['node']:>4}  {r['local_rank']:>10}  {r['dp_replicate']:>12}  "
                     f"{r['dp_shard']:>8}  {r['efsdp']:>5}  {r['ep']:>2}")
    groups = report["ep_groups"]
    shown = ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups[:8])
    lines.append(f"EP groups ({len(groups)}): {shown}{', ...' if len(groups) > 8 else ''}"
                 + ("; each spans several nodes: the token all-to-all leaves NVLink" if report["ep_groups_cross_nodes"] else
                    "; each within one node"))
    lines.append(f"per rank ({lay['dtype']}, {lay['optimizer']}): params {mem['params']} GiB, master "
                 f"{mem['master_params_fp32']} GiB, grads {mem['grads']} GiB, optimizer state "
                 f"{mem['optimizer_state']} GiB, total {mem['total']} GiB")
    act = report["activations"]
    lines.append(f"activations per rank ({act['activation_checkpointing']}, micro-batch {act['micro_batch_size']} x seq "
                 f"{act['seq_len']}): kept {act['kept_gib']} GiB, peak {act['peak_gib']} GiB")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """key=value arguments -> (validated ModelConfig, inspect() keyword arguments; with world_size also
    world_size, gpus_per_node, json, and the parallel.* sizes for dry_run)."""
    name, model_overrides, kwargs = "tiny", [], {}
    parallel_keys = {"parallel.dp_replicate": "dp_replicate", "parallel.dp_shard": "dp_shard", "parallel.ep": "ep"}
    int_keys = {"world_size": "world_size", "gpus_per_node": "gpus_per_node", "train.seq_len": "seq_len",
                "train.micro_batch_size": "micro_batch_size"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"argument {arg!r}: expected key=value (see kimi-train-inspect --help)")
        if key == "model":
            name = value
        elif key.startswith("model."):
            model_overrides.append(f"{key[len('model.'):]}={value}")
        elif key in parallel_keys:
            try:
                kwargs[parallel_keys[key]] = int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: must be a positive integer") from None
        elif key in int_keys:
            try:
                kwargs[int_keys[key]] = int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: must be a positive integer") from None
        elif key == "json":
            kwargs["json"] = value.lower() in ("1", "true", "yes")
        elif key in ("dtype", "optimizer"):
            kwargs[key] = value
        elif key == "train.activation_checkpointing":
            kwargs["activation_checkpointing"] = value
        elif key == "train.recompute_moe_down_proj":
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{key}={value!r}: must be true or false")
            kwargs["recompute_moe_down_proj"] = value.lower() == "true"
        elif key == "moe_imbalance":
            try:
                kwargs[key] = float(value)
            except ValueError:
                kwargs[key] = float("nan")
            if not 0 <= kwargs[key] < float("inf"):
                raise ValueError(f"{key}={value!r}: must be a number >= 0 (0.25: the busiest EP rank gets 25% more slots)")
        elif key == "gpu_mem":
            kwargs[key] = parse_size(value)
        else:
            valid = ("model, model.FIELD, parallel.dp_replicate, parallel.dp_shard, parallel.ep, dtype, optimizer, "
                     "world_size, gpus_per_node, json, train.seq_len, train.micro_batch_size, "
                     "train.activation_checkpointing, train.recompute_moe_down_proj, moe_imbalance, gpu_mem (--gpu-mem)")
            raise ValueError(f"unknown argument {key!r}; valid: {valid}")
    try:
        base = load_model_config(name)
    except (OSError, yaml.YAMLError) as e:  # a model=PATH.yaml that cannot be read or parsed
        raise ValueError(f"model={name!r} cannot be read: {str(e).splitlines()[0]}") from None
    if model_overrides:
        try:
            merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(model_overrides))
        except OmegaConfBaseException as e:
            raise ValueError(str(e).splitlines()[0] + f" (in {' '.join(model_overrides)})") from None
        base = model_config_from_dict(OmegaConf.to_container(merged))
    return base, kwargs


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    try:
        cfg, kwargs = parse_args(_gpu_mem_flag(args))
        as_json = kwargs.pop("json", None)
        gpu_mem = kwargs.pop("gpu_mem", None)
        if "world_size" in kwargs or "gpus_per_node" in kwargs:
            world_size = kwargs.pop("world_size", None)
            if world_size is None:
                raise ValueError("gpus_per_node needs world_size=N (the dry run of a launch)")
            parallel = {k: kwargs.pop(k) for k in ("dp_replicate", "dp_shard", "ep") if k in kwargs}
            report = dry_run(cfg, world_size, kwargs.pop("gpus_per_node", world_size), parallel, **kwargs)
            print(json.dumps(report, indent=2) if as_json else format_dry_run(report))
            return
        report = inspect(cfg, **kwargs)
        if gpu_mem is not None:
            rows = fit_table(cfg, report, gpu_mem, kwargs.get("recompute_moe_down_proj", False),
                             kwargs.get("moe_imbalance", 0.0))
    except ValueError as e:  # the model config's, the layout's and ours: one line each
        print(f"kimi-train-inspect: {e}", file=sys.stderr)
        raise SystemExit(2)
    if gpu_mem is None:
        print(json.dumps(report, indent=2))
    elif as_json:
        print(json.dumps({**report, "gpu_mem_bytes": gpu_mem, "fit": rows}, indent=2))
    else:
        print(format_fit_table(report, rows, gpu_mem, cfg.num_hidden_layers))


def _gpu_mem_flag(args: list[str]) -> list[str]:
    """``--gpu-mem 80GiB`` and ``--gpu-mem=80GiB`` -> ``gpu_mem=80GiB``."""
    out, i = [], 0
    while i < len(args):
        if args[i] == "--gpu-mem":
            if i + 1 == len(args):
                raise ValueError("--gpu-mem needs a size, e.g. --gpu-mem 80GiB")
            out.append(f"gpu_mem={args[i + 1]}")
            i += 2
            continue
        out.append("gpu_mem=" + args[i][len("--gpu-mem="):] if args[i].startswith("--gpu-mem=") else args[i])
        i += 1
    return out


if __name__ == "__main__":
    main()
