"""Checkpoints: torch.distributed.checkpoint (DCP) for tensors, JSON for the rest; atomic, self-verifying.

Layout of one checkpoint (RUN_DIR/checkpoints/step_00000040/):

    __0_0.distcp ...       DCP shards of the engine's state_dict() ({"model": ..., "optim": ...}),
    .metadata              resharded on load (a run saved with one sharding loads into another)
    trainer_state.json     step, skipped steps, data-loader position, schedule, engine name
    rng_rank{r}.json       each rank's RNG states (torch CPU/CUDA, python, numpy)
    MANIFEST.json          every file above: its size in bytes and its CRC-32
    COMPLETE               written last, before the directory is renamed into place

By concern:

    manifest.py   MANIFEST.json, CRC-32s, ``verify_checkpoint``
    store.py      paths, the atomic save and the prune, RNG states, the one fault-injection hook
    load.py       loading with fallback past damaged checkpoints (``load_latest``), into an engine

What is saved is the engine's (``kimi_train.parallel.engine.TrainEngine.state_dict``): FSDP2's
DTensors and torch's optimizer layout, or DeepSpeed's flat partitions
(kimi_train/parallel/deepspeed_checkpoint.py). Small state is JSON; DCP itself reads its
``.metadata`` with pickle, so a checkpoint is trusted input, like any torch checkpoint.
"""

from .load import latest_usable, load_checkpoint, load_latest
from .manifest import MANIFEST, verify_checkpoint
from .store import (
    COMPLETE,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_path,
    checkpoints_root,
    complete_checkpoints,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

__all__ = ["COMPLETE", "MANIFEST", "TRAINER_STATE", "CheckpointError", "checkpoint_path", "checkpoints_root",
           "complete_checkpoints", "latest_checkpoint", "latest_usable", "load_checkpoint", "load_latest",
           "rng_state", "save_checkpoint", "set_rng_state", "verify_checkpoint"]
