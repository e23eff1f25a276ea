"""Metrics: RUN_DIR/metrics.jsonl, Weights & Biases, and model FLOPs for MFU.

Only rank 0 writes. One JSON object per logged step; the fields are listed in
docs/training.md. On resume the file is cut back to the resumed step, so a run that
was killed and resumed has exactly one record per step.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from kimi_train.errors import UserError

# Dense bf16 peak FLOP/s per device (no sparsity), for MFU. Matched as substrings of the device name.
PEAK_FLOPS_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
}


def peak_flops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """The configured peak, else the table's entry for this GPU, else None (no MFU)."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS_BF16.items():
            if key in name:
                return value
    return None


def flops_per_token(model: torch.nn.Module, model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_active + causal attention 6 * L * T/2 * H * (d_qk + d_v).

    N_active counts every parameter that multiplies activations (not the embedding
    lookup), with routed experts scaled by top_k / E.
    """
    from kimi_train.model import GroupedExperts

    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
    ratio = model_cfg.num_experts_per_tok / max(model_cfg.n_routed_experts, 1)
    active = 0.0
    for p in model.parameters():
        if id(p) in embed_ids and not model_cfg.tie_word_embeddings:
            continue
        active += p.numel() * (ratio if id(p) in expert_ids else 1.0)
    if model_cfg.attention_type == "mla":
        d_qk, d_v = model_cfg.qk_head_dim, model_cfg.v_head_dim
    else:
        d_qk = d_v = model_cfg.gqa_head_dim
    attn = 6 * model_cfg.num_hidden_layers * (seq_len / 2) * model_cfg.num_attention_heads * (d_qk + d_v)
    return 6 * active + attn


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLogger:
    """Appends records to metrics.jsonl and mirrors them to wandb (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, wandb_mode: str = "disabled",
                 wandb_project: str = "kimi-train", run_name: str = "run", config: Optional[dict] = None):
        self.enabled, self.path, self._wandb = enabled, Path(run_dir) / "metrics.jsonl", None
        # wandb keys name a layer by its model index; the MoE records list the MoE layers only
        model = (config or {}).get("model") or {}
        first_moe = model.get("first_k_dense_replace", 0) if model.get("n_routed_experts", 0) else 0
        self._first_layer = {"expert_load_imbalance_per_layer": int(first_moe)}
        if not enabled:
            return
        self._truncate(resume_step)
        self._file = open(self.path, "a")
        if wandb_mode != "disabled":
            self._wandb = _init_wandb(run_dir, wandb_mode, wandb_project, run_name, config or {})

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items() if v is not None}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list)}
            for key, values in record.items():  # max_logit_per_layer -> max_logit_per_layer/0, /1, ...
                if key.endswith("_per_layer") and isinstance(values, list):
                    first = self._first_layer.get(key, 0)
                    for i, v in enumerate(values):
                        flat[f"{key}/{first + i}"] = v
            self._wandb.log(flat, step=record["step"])

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _init_wandb(run_dir: Path, mode: str, project: str, run_name: str, config: dict):
    """A quiet wandb run in RUN_DIR/wandb: no console capture, no banner; a resumed run continues it."""
    import wandb

    # A stable id from the run directory: a resumed run continues the same wandb run.
    run_id = "kt-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(project=project, name=run_name, id=run_id, resume="allow", mode=mode, dir=str(run_dir),
                          config=config, settings=wandb.Settings(silent=True, console="off"))
    except wandb.errors.Error as e:  # e.g. online without `wandb login`
        raise UserError(f"logging.wandb={mode}: wandb could not start ({str(e).strip().splitlines()[0]}); "
                        "run `wandb login`, or use logging.wandb=offline or disabled") from None
