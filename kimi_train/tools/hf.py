"""Hugging Face interop: our model <-> a transformers DeepseekV3ForCausalLM directory.

    from kimi_train.tools.hf import export, load
    export(model, "out/")             # config.json (model_type deepseek_v3) + model.safetensors
    model = load("out/")              # KimiForCausalLM; model(input_ids_BT) -> logits_BTV

    kimi-train-export RUN_DIR_OR_HF_DIR OUT_DIR [--rope-interleave] [--force]

The directory loads with transformers.AutoModelForCausalLM.from_pretrained (no remote
code); exported from a run directory it also holds the run's tokenizer
(RUN_DIR/tokenizer/), so transformers.AutoTokenizer.from_pretrained(OUT_DIR) gives the ids
the model was trained on, and config.json names its eos token. Files get the usual
permissions (0o666 and 0o777 less the umask). Routed experts are written per expert (``mlp.experts.{j}.{gate,up,down}_proj.weight``),
the layout of DeepSeek's and Kimi's checkpoints, which transformers (>= 5) fuses on load;
`load` reads both that layout and transformers' fused ``experts.gate_up_proj``.

RoPE layout: our model rotates pairs (i, i + D/2) ("half"); DeepSeek/Kimi checkpoints rotate
pairs (2i, 2i+1) ("interleaved", config ``rope_interleave: true``). `export` writes the half
layout with ``rope_interleave: false`` by default (exact, nothing permuted), or permutes the
rope rows of q and of kv_a_proj_with_mqa when asked for ``rope_interleave=True``; `load`
undoes the permutation whenever the config says interleaved. Logits are the same either way.
Only MLA models can be exported (transformers' DeepseekV3 has no GQA attention).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch

from kimi_train.errors import UserError
from kimi_train.fs import writable_dir

from kimi_train.model import KimiForCausalLM, ModelConfig, model_config_from_dict
from kimi_train.model.rope import half_to_interleaved, interleaved_to_half

_SAME_NAME_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
]  # fmt: skip


# ------------------------------------------------------------------------------------ config
def hf_config_dict(cfg: ModelConfig, rope_interleave: bool = False, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of transformers' DeepseekV3 for our config."""
    if cfg.attention_type != "mla":
        raise ValueError(f"model.attention_type={cfg.attention_type!r}: only 'mla' models export to deepseek_v3")
    d: dict[str, Any] = {name: getattr(cfg, name) for name in _SAME_NAME_FIELDS}
    if cfg.n_routed_experts == 0:  # all-dense: keep a valid MoE section that no layer uses
        d.update(n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
                 first_k_dense_replace=cfg.num_hidden_layers)  # fmt: skip
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        rope.update(rope_type="yarn", rope_theta=cfg.rope_theta)
    d.update(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        rope_parameters=rope,
        rope_interleave=rope_interleave,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=cfg.init_std,
        num_nextn_predict_layers=0,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        dtype=dtype,
        use_cache=True,
    )
    return d


def model_config_from_hf(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig from a deepseek_v3 / kimi_k2 config.json dict."""
    kw: dict[str, Any] = {name: d[name] for name in _SAME_NAME_FIELDS if d.get(name) is not None}
    rope = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", legacy.get("type", legacy.get("rope_type", "default"))))
    if kind == "yarn":
        src = {**legacy, **rope}
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
        kw["rope_scaling"] = {"type": "yarn", **{k: src[k] for k in keys if src.get(k) is not None}}
    elif kind not in ("default", None):
        raise ValueError(f"rope type {kind!r} in config.json: only default and yarn are supported")
    kw["init_std"] = float(d.get("initializer_range", 0.02))
    kw["attention_type"] = "mla"
    kw.update(overrides)
    return model_config_from_dict(kw, source="config.json")


# ------------------------------------------------------------------------------------ weights
def _rope_rows(w: torch.Tensor, heads: int, block: int, rope: int, fn) -> torch.Tensor:
    """Apply `fn` to the last `rope` rows of each of `heads` blocks of `block` rows."""
    w_HXI = w.reshape(heads, block, -1).clone()
    w_HXI[:, block - rope :] = fn(w_HXI[:, block - rope :], rope)
    return w_HXI.reshape(w.shape)


def _convert_rope(sd: dict[str, torch.Tensor], cfg: ModelConfig, fn) -> None:
    H, Dqk, Dr = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_rope_head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        q = p + ("q_proj.weight" if cfg.q_lora_rank is None else "q_b_proj.weight")
        sd[q] = _rope_rows(sd[q], H, Dqk, Dr, fn)
        kv_a = p + "kv_a_proj_with_mqa.weight"
        sd[kv_a] = _rope_rows(sd[kv_a], 1, cfg.kv_lora_rank + Dr, Dr, fn)


def to_hf_state_dict(model: KimiForCausalLM, rope_interleave: bool = False) -> dict[str, torch.Tensor]:
    """Our state_dict in transformers' naming: per-expert weights, no runtime buffers."""
    cfg = model.config
    sd: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        if key.endswith("tokens_per_expert"):
            continue  # routing statistics, not model state
        if ".mlp.experts." in key:  # [E, out, in] -> E matrices
            prefix, proj = key.rsplit(".", 1)
            for j in range(t.shape[0]):
                sd[f"{prefix}.{j}.{proj}.weight"] = t[j].contiguous()
            continue
        sd[key] = t.contiguous()
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()  # safetensors refuses shared storage
    if rope_interleave:
        _convert_rope(sd, cfg, half_to_interleaved)
    return sd


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, rope_interleave: bool) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`; also accepts transformers' fused experts.gate_up_proj."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in sd.items():
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) >= cfg.num_hidden_layers:
            continue  # multi-token-prediction layers: not part of the causal LM
        if ".mlp.experts." in key and parts[-1] == "weight":  # model.layers.i.mlp.experts.j.proj.weight
            prefix = ".".join(parts[:5])
            experts.setdefault((prefix, parts[6]), {})[int(parts[5])] = t
        elif key.endswith(".mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            out[key.replace("gate_up_proj", "gate_proj")] = gate
            out[key.replace("gate_up_proj", "up_proj")] = up
        else:
            out[key] = t
    for (prefix, proj), by_idx in experts.items():
        out[f"{prefix}.{proj}"] = torch.stack([by_idx[j] for j in range(len(by_idx))])
    if rope_interleave:
        _convert_rope(out, cfg, interleaved_to_half)
    return out


# ------------------------------------------------------------------------------------ API
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(model: KimiForCausalLM, out_dir: Union[str, Path], rope_interleave: bool = False,
           tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors that transformers' DeepseekV3ForCausalLM loads.

    tokenizer: None, one of kimi_train.data's tokenizers, or a directory that
    kimi_train.data.tokenizer.save_pretrained wrote (a run's RUN_DIR/tokenizer): its files go
    next to the weights and its eos id into config.json (eos_token_id; no bos token).
    """
    from safetensors.torch import save_file

    from kimi_train.data.tokenizer import copy_saved, save_pretrained, saved_eos_id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(model, rope_interleave=rope_interleave)
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    config = hf_config_dict(model.config, rope_interleave=rope_interleave, dtype=dtype)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            copy_saved(tokenizer, out)
            eos = saved_eos_id(tokenizer)
        else:
            save_pretrained(tokenizer, out, model.config.max_position_embeddings)
            eos = tokenizer.eos_id
        config.update(bos_token_id=None, eos_token_id=eos)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = out / "model.safetensors"
    save_file({k: v.cpu() for k, v in sd.items()}, str(weights), metadata={"format": "pt"})
    os.chmod(weights, 0o666 & ~_umask())  # safetensors creates it 0o600
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load_file(str(path / name)))
    return sd


def load(path: Union[str, Path], dtype: Optional[torch.dtype] = None, **overrides: Any) -> KimiForCausalLM:
    """Our KimiForCausalLM from a deepseek_v3 directory (ours or transformers'). Strict: every key must match."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    hf_cfg = json.loads((path / "config.json").read_text())
    cfg = model_config_from_hf(hf_cfg, **overrides)
    with torch.device("meta"):
        model = KimiForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # buffers (router bias, rope) get sane values before the load
    sd = from_hf_state_dict(_read_safetensors(path), cfg, bool(hf_cfg.get("rope_interleave", True)))
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "lm_head.weight" and not k.endswith("tokens_per_expert")]
    else:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("tokens_per_expert")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(dtype) if dtype is not None else model


HF_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")  # what --force clears first


def _source(src: Path) -> tuple[KimiForCausalLM, Any]:
    """(model, tokenizer for export(): a directory, one of ours, or None) of SRC."""
    if not src.exists():
        raise UserError(f"{str(src)!r} does not exist; pass a kimi-train run directory or a Hugging Face model directory")
    if not src.is_dir():
        raise UserError(f"{str(src)!r} is a file; pass a kimi-train run directory or a Hugging Face model directory")
    if (src / "config.json").is_file() and any(src.glob("*.safetensors")):
        # already a Hugging Face directory: re-export (e.g. to change the rope layout), tokenizer included
        has_tokenizer = (src / "tokenizer_config.json").is_file()
        return load(src), src if has_tokenizer else None
    from kimi_train.tools.run_model import load_model_from_run

    model = load_model_from_run(src)
    return model, run_tokenizer(src)


def run_tokenizer(run_dir: Path) -> Any:
    """The run's tokenizer: its directory RUN_DIR/tokenizer, or, for a run from before the trainer
    kept it, the one config.yaml's data section builds (bpe: the cached one, or trained again on
    the same corpus); None when config.yaml has no data section."""
    from kimi_train.data.tokenizer import TOKENIZER_DIR

    saved = run_dir / TOKENIZER_DIR
    if (saved / "tokenizer_config.json").is_file():
        return saved
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    if "data" not in cfg:
        return None
    from kimi_train.config import DataConfig
    from kimi_train.data.loader import build_tokenizer

    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
    return build_tokenizer(data)


def _prepare_out(out: Path, force: bool, src_is_out: bool) -> None:
    """OUT_DIR must be new or empty, unless --force (then old weight files are removed first)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT_DIR {str(out)!r} is a file; pass a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"OUT_DIR {str(out)!r} is not empty; pass a new or empty directory, or --force to "
                            "replace the export there")
        if src_is_out:
            raise UserError(f"OUT_DIR {str(out)!r} is the directory being exported; pass another one")
        for pattern in HF_WEIGHT_FILES:
            for f in out.glob(pattern):
                f.unlink()
    writable_dir(out, "OUT_DIR")


USAGE = "usage: kimi-train-export RUN_DIR_OR_HF_DIR OUT_DIR [--rope-interleave] [--force]"


def main(argv: Optional[list[str]] = None) -> None:
    """kimi-train-export RUN_DIR_OR_HF_DIR OUT_DIR [--rope-interleave] [--force]

    OUT_DIR must be new or empty; --force writes into a non-empty one, replacing an earlier
    export there (its weight files are removed first). Errors: one line, exit 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + "\n\n" + __doc__)
        return
    flags = {a for a in args if a.startswith("--")}
    args = [a for a in args if not a.startswith("--")]
    unknown = flags - {"--rope-interleave", "--force"}
    if len(args) != 2 or unknown:
        print(f"kimi-train-export: unknown option {sorted(unknown)[0]!r}; " if unknown else "kimi-train-export: ",
              USAGE, sep="", file=sys.stderr)
        raise SystemExit(2)
    src, out = Path(args[0]), Path(args[1])
    try:
        model, tokenizer = _source(src)
        _prepare_out(out, "--force" in flags, src.resolve() == out.resolve())
        export(model, out, rope_interleave="--rope-interleave" in flags, tokenizer=tokenizer)
    except (UserError, ValueError) as e:  # ValueError: this module's and load_model_from_run's, one line each
        print(f"kimi-train-export: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps({"exported": str(out), "parameters": sum(p.numel() for p in model.parameters()),
                      "tokenizer": tokenizer is not None}))


if __name__ == "__main__":
    main()
