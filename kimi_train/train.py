"""`kimi-train` (also `python -m kimi_train.train`): the Hydra entry point.

    kimi-train                                    # tiny model, MuonClip, stdlib corpus
    kimi-train model=small optim=adamw train.steps=1000 run_name=small-adamw
    kimi-train -m optim=muonclip,adamw            # multirun: runs/multirun/optim=muonclip, .../optim=adamw
    torchrun --nproc_per_node 8 -m kimi_train.train parallel.dp_shard=8

Config problems (unknown keys, bad values) end the process with ONE line on stderr and
exit code 2, before any work is done. The run directory is deterministic (run_dir, or
runs/<run_name>, run_name defaulting to "<model>-<optim>"), so every rank of a torchrun
job and every restart of a run agree on it; resume=auto continues from its latest
complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from kimi_train.config import ConfigError, TrainConfig, register_configs, validate
from kimi_train.errors import Interrupted, TrainingError, UserError

try:
    from kimi_train.paths import config_dir as _config_dir

    CONFIG_DIR = str(_config_dir())
except ImportError:  # pragma: no cover - paths.py comes with the model package
    CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


# ---------------------------------------------------------------------------- resolvers used by config.yaml
def _default_run_name() -> Optional[str]:
    """A launcher's name for a run that names none (launch/slurm.sbatch: <job name>-<job id>)."""
    return os.environ.get("KIMI_TRAIN_DEFAULT_RUN_NAME") or None


def _run_dir(run_dir: Optional[str], run_name: Optional[str], model: str, optim: Optional[str]) -> str:
    if run_dir:
        return str(run_dir)
    run_name = run_name or _default_run_name()
    if run_name:
        return f"runs/{run_name}"
    return f"runs/{model}-{optim}" if optim else f"runs/{model}"


def _sweep_dir(run_dir: Optional[str], run_name: Optional[str]) -> str:
    return str(run_dir) if run_dir else f"runs/{run_name or 'multirun'}"


def _sweep_subdir(task_overrides: Any, job_num: Any, sweeper_params: Optional[Mapping[str, Any]] = None) -> str:
    """This job's values of the swept keys only, e.g. "optim=adamw,optim.lr=0.01" (else "job<N>").

    task_overrides: the job's own overrides (hydra.overrides.task), one "key=value" each, so a
    value with commas in it stays whole. A key is swept as Hydra's BasicSweeper decides: a sweep
    in the config's hydra.sweeper.params or on the command line, the command line winning for a
    key given in both. The command line is read from sys.argv; where that is not the kimi-train
    -m command (a launcher that runs jobs in other processes), every override names the job.
    Parts are sorted by key (as Hydra's override_dirname), so the order on the command line
    does not matter; a name over 200 characters is cut and ends in a hash of the whole, so two
    jobs never share a directory.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()

    def parsed(args: list[str]) -> list[tuple[str, Any]]:
        out = []
        for arg in args:
            try:
                out.append((arg, parser.parse_overrides([arg])[0]))
            except OverrideParseException:  # the value of a flag such as --config-name
                continue
        return out

    job = parsed([str(a) for a in (task_overrides or [])])
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") for a in argv):
        final = {}
        declared = [f"{key}={value}" for key, value in (sweeper_params or {}).items()]
        for _, override in parsed(declared + [a for a in argv if not a.startswith("-")]):
            final[override.get_key_element()] = override
        swept = {key for key, override in final.items() if override.is_sweep_override()}
    else:
        swept = {override.get_key_element() for _, override in job}
    parts = sorted(arg for arg, override in job if override.get_key_element() in swept)
    name = re.sub(r"[^A-Za-z0-9=,._+\-]", "_", ",".join(parts))
    if len(name) > 200:
        name = name[:187] + "-" + hashlib.sha1(",".join(parts).encode()).hexdigest()[:12]
    return name if name else f"job{job_num}"


def _rank0_only(value: str) -> Optional[str]:
    return value if os.environ.get("RANK", "0") == "0" else None


def register_resolvers() -> None:
    resolvers = {"kt_run_dir": _run_dir, "kt_sweep_dir": _sweep_dir, "kt_sweep_subdir": _sweep_subdir,
                 "kt_rank0_only": _rank0_only}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
register_configs()


# ---------------------------------------------------------------------------- the app
def to_train_config(cfg: DictConfig) -> tuple[TrainConfig, dict]:
    """The composed DictConfig as a TrainConfig, with run_dir/run_name filled in from Hydra."""
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    choices = hc.runtime.choices
    run_name = cfg.run_name or (Path(run_dir).name if (cfg.run_dir or hc.mode.name == "MULTIRUN")
                                else _default_run_name() or f"{choices.get('model')}-{choices.get('optim')}")
    cfg.run_dir, cfg.run_name = run_dir, run_name
    # Re-merge into the bare schema: catches keys appended with "+key=..." that it does not know.
    typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=True))
    return OmegaConf.to_object(typed), OmegaConf.to_container(typed, resolve=True)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    from kimi_train.parallel import ParallelDims

    from omegaconf.errors import OmegaConfBaseException

    try:
        train_cfg, resolved = to_train_config(cfg)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            dp_size = ParallelDims.from_config(train_cfg.parallel, world_size, train_cfg.model).dp_size
        except ValueError as e:
            raise ConfigError(str(e)) from None
        validate(train_cfg, dp_size)
    except (ConfigError, OmegaConfBaseException) as e:
        # Exit from inside the job: Hydra would otherwise add its own multi-line report.
        print(f"kimi-train: config error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)

    import torch.distributed as dist

    from kimi_train.loop.trainer import Trainer
    from kimi_train.parallel import destroy_distributed

    owns_group = not dist.is_initialized()  # under torchrun the Trainer initialises it
    try:
        Trainer(train_cfg, train_cfg.run_dir, resolved).fit()
    except (UserError, TrainingError, Interrupted) as e:
        raise _JobError(e) from e  # past Hydra, which would print a line of its own for an Exception
    if owns_group and dist.is_initialized():  # success: every rank tears down what the run set up, before exit
        destroy_distributed()


class _JobError(BaseException):
    """Carries one of kimi_train.errors' exceptions out of the Hydra job to main()."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _one_line(ex: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line (they are multi-line, with hints)."""
    from hydra.errors import MissingConfigException

    if isinstance(ex, MissingConfigException) and getattr(ex, "options", None):
        group = Path(ex.missing_cfg_file or "").parent.name or "group"
        name = Path(ex.missing_cfg_file or "").name
        return f"{group}={name!r} is not a known config; valid values: {', '.join(o for o in ex.options if not o.startswith('base_'))}"
    parts = [str(ex).strip()]
    if ex.__cause__ is not None:
        parts.append(str(ex.__cause__).strip())
    text = " ".join(p.splitlines()[0] for p in parts if p)
    for hint in ("\tfull_key", "    full_key"):
        text = text.split(hint)[0]
    return text.strip()


@record  # under torchrun: a rank's traceback goes into torchrun's failure summary
def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: kimi_train.errors' exit codes, one line each.

    UserError (a config value, a path, the run directory, data): exit 2; TrainingError: exit 1;
    Interrupted (SIGINT/SIGTERM, after saving): 130 / 143. KIMI_TRAIN_DEBUG=1 re-raises them
    with their traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let errors reach us instead of Hydra's exit(1)
    debug = os.environ.get("KIMI_TRAIN_DEBUG", "") not in ("", "0")
    try:
        try:
            _hydra_main()
        except _JobError as job:
            raise job.error from None
    except ConfigError as e:
        _exit(f"config error: {e}", 2, debug)
    except (HydraException, OmegaConfBaseException) as e:
        _exit(f"config error: {_one_line(e)}", 2, debug)
    except UserError as e:
        _exit(str(e), 2, debug)
    except TrainingError as e:
        _exit(str(e), 1, debug)
    except Interrupted as e:  # every rank stops; one of them says so
        if os.environ.get("RANK", "0") == "0":
            print(f"kimi-train: {e}", file=sys.stderr, flush=True)
        if e.exit_code == 0:  # the stop came from another node: end this node's launcher too (it may
            from kimi_train.loop.interrupt import stop_own_launcher  # end this process before it exits)

            stop_own_launcher()
        sys.exit(e.exit_code)


def _exit(message: str, code: int, debug: bool, quiet: bool = False) -> None:
    if debug:
        raise
    if not quiet:
        print(f"kimi-train: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
