"""kimi-train-prepare: tokenize a source once into a prepared dataset (Megatron shards + tokenizer + manifest).

    kimi-train-prepare data=files 'data.paths=[a.jsonl,b/]' data.tokenizer=bpe out=DIR workers=2
    kimi-train-prepare data=stdlib data.max_bytes=0 out=DIR
    kimi-train-prepare verify=DIR                       # every shard's sha256 against the manifest
    kimi-train data=prepared 'data.paths=[DIR]'         # then train on it

Arguments: the data= group and data.* keys of kimi-train (configs/data/), plus
    out=DIR        the prepared dataset's directory (a stopped prepare continues there)
    workers=N      tokenizing processes (default: one per core)
    force=true     replace a different dataset at out
    progress=false no progress bar
Problems end with one line on stderr and exit code 2. This module imports nothing heavy at
import time: the worker processes (spawned) import it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

USAGE = "usage: kimi-train-prepare [data=NAME] [data.KEY=VALUE ...] out=DIR [workers=N] [force=true] | verify=DIR"
_OWN = ("out", "workers", "force", "progress", "verify")


def _data_config(overrides: list[str]):
    """The data section of kimi-train's config for these overrides, validated like kimi-train's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kimi_train.config import TrainConfig, validate_data
    from kimi_train.train import CONFIG_DIR  # registers the schemas and resolvers

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=False))
    data = OmegaConf.to_object(typed).data
    validate_data(data)
    return data


def _flag(value: str, key: str) -> bool:
    from kimi_train.errors import UserError

    if value.lower() not in ("true", "false"):
        raise UserError(f"{key}={value!r} is not valid; use true or false")
    return value.lower() == "true"


def run(argv: list[str]) -> str:
    """Do what argv says; the line to print."""
    from kimi_train.data.errors import DataError
    from kimi_train.errors import UserError

    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a and a.split("=", 1)[0] in _OWN}
    overrides = [a for a in argv if not ("=" in a and a.split("=", 1)[0] in _OWN)]
    if "verify" in own:
        from kimi_train.data.prepare import verify

        m = verify(own["verify"])
        return f"verify: {own['verify']} ok ({len(m['shards'])} shards, {m['documents']:,} documents, {m['tokens']:,} tokens)"
    if "out" not in own:
        raise UserError(f"out=DIR is missing; {USAGE}")
    try:
        workers = int(own.get("workers", os.cpu_count() or 1))
    except ValueError:
        workers = -1
    if workers < 0:
        raise UserError(f"workers={own['workers']!r} is not valid; a number >= 0 (0: tokenize in this process)")
    data = _data_config(overrides)
    if data.source == "prepared" or data.mix:
        raise DataError("kimi-train-prepare reads a source: data=stdlib, data=files or data=hub, not prepared data")
    from kimi_train.data.loader import build_tokenizer
    from kimi_train.data.prepare import MANIFEST, prepare
    from kimi_train.fs import writable_dir

    out = writable_dir(own["out"], "out")
    tokenizer = build_tokenizer(data)
    prepare(data, out, tokenizer, workers=workers, force=_flag(own.get("force", "false"), "force"),
            progress=_flag(own.get("progress", "true"), "progress"))
    import json

    m = json.loads((out / MANIFEST).read_text())
    return (f"prepared: {out}: {len(m['shards'])} shards, {m['documents']:,} documents, {m['tokens']:,} tokens "
            f"({m['dtype']}), tokenizer {m['tokenizer']['name']} (vocab {m['tokenizer']['vocab_size']}), "
            f"unigram entropy {m['unigram_entropy']:.3f}")


def main(argv: Optional[list[str]] = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kimi_train.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        print(run(argv), flush=True)
    except UserError as e:
        print(f"kimi-train-prepare: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        from kimi_train.train import _one_line

        print(f"kimi-train-prepare: config error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
