"""kimi-train-inspect: parameter counts and per-rank memory of a model config, without allocating it.

    kimi-train-inspect model=k2 parallel.dp_shard=256 parallel.ep=32 dtype=bf16
    kimi-train-inspect model=tiny model.num_hidden_layers=8 optimizer=adamw
    kimi-train-inspect world_size=16 gpus_per_node=8 parallel.ep=8 model=k2_mini     # a launch's dry run

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

The model is built on the meta device (no memory), so model=k2 answers in a second. Memory is
per rank and counts parameters, gradients, master weights and optimizer state (FSDP2-style:
each tensor sharded along dim 0, the largest rank's share); activations are not included.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kimi_train.model import KimiForCausalLM, ModelConfig, load_model_config
from kimi_train.model.config import model_config_from_dict

COMPONENTS = ["embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "lm_head"]
MUON_COMPONENTS = {"attention", "dense_mlp", "routed_experts", "shared_experts", "router"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


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
    optimizer: str = "muon",
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
    }


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
                 f"{mem['optimizer_state']} GiB, total {mem['total']} GiB (activations not included)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """key=value arguments -> (validated ModelConfig, inspect() keyword arguments; with world_size also
    world_size, gpus_per_node, json, and the parallel.* sizes for dry_run)."""
    name, model_overrides, kwargs = "tiny", [], {}
    parallel_keys = {"parallel.dp_replicate": "dp_replicate", "parallel.dp_shard": "dp_shard", "parallel.ep": "ep"}
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
        elif key in ("world_size", "gpus_per_node"):
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: must be a positive integer") from None
        elif key == "json":
            kwargs["json"] = value.lower() in ("1", "true", "yes")
        elif key in ("dtype", "optimizer"):
            kwargs[key] = value
        else:
            valid = ("model, model.FIELD, parallel.dp_replicate, parallel.dp_shard, parallel.ep, dtype, optimizer, "
                     "world_size, gpus_per_node, json")
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
        cfg, kwargs = parse_args(args)
        as_json = kwargs.pop("json", None)
        if "world_size" in kwargs or "gpus_per_node" in kwargs:
            world_size = kwargs.pop("world_size", None)
            if world_size is None:
                raise ValueError("gpus_per_node needs world_size=N (the dry run of a launch)")
            parallel = {k: kwargs.pop(k) for k in ("dp_replicate", "dp_shard", "ep") if k in kwargs}
            report = dry_run(cfg, world_size, kwargs.pop("gpus_per_node", world_size), parallel, **kwargs)
            print(json.dumps(report, indent=2) if as_json else format_dry_run(report))
            return
        report = inspect(cfg, **kwargs)
    except ValueError as e:  # the model config's, the layout's and ours: one line each
        print(f"kimi-train-inspect: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
