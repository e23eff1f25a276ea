"""ParallelDims: inference of -1, one-line ValueErrors before any collective (no processes needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kimi_train.parallel import ParallelDims

MOE = SimpleNamespace(n_routed_experts=8)


def test_infer_and_single_process():
    d = ParallelDims.from_config({"dp_replicate": 1, "dp_shard": -1, "ep": 1}, 1, MOE)
    assert (d.world_size, d.dp_shard, d.dp_size, d.dp_rank, d.dp_group) == (1, 1, 1, 0, None)
    assert d.build_mesh("cpu") is None


def test_infer_dp_shard_and_efsdp():
    # from_config does no collective, so a world size > 1 is fine without a process group
    d = ParallelDims.from_config(SimpleNamespace(dp_replicate=2, dp_shard=-1, ep=2), 8, MOE)
    assert (d.dp_replicate, d.dp_shard, d.ep, d.efsdp, d.dp_size) == (2, 4, 2, 2, 8)


@pytest.mark.parametrize(
    "cfg,world,match",
    [
        ({"dp_shard": 3}, 4, r"dp_replicate \* parallel.dp_shard = 1 \* 3 = 3, but the world size is 4"),
        ({"dp_replicate": 3}, 4, "dp_replicate=3 does not divide the world size 4"),
        ({"ep": 3}, 4, r"parallel.ep=3 must divide parallel.dp_shard=4"),
        ({"ep": 4}, 4, None),  # fine: 8 experts, 4 ranks
        ({"ep": 0}, 4, "parallel.ep=0; valid: an int >= 1"),
        ({"dp_shard": 0}, 4, "parallel.dp_shard=0; valid: an int >= 1, or -1 to infer"),
        ({"dp_replicate": "2"}, 4, "parallel.dp_replicate='2'; valid: an int >= 1"),
    ],
)
def test_validation_errors(cfg, world, match):
    if match is None:
        ParallelDims.from_config(cfg, world, MOE)
        return
    with pytest.raises(ValueError, match=match) as e:
        ParallelDims.from_config(cfg, world, MOE)
    assert "\n" not in str(e.value)


def test_validation_against_model():
    with pytest.raises(ValueError, match="parallel.ep=4 must divide model.n_routed_experts=6"):
        ParallelDims.from_config({"ep": 4}, 8, SimpleNamespace(n_routed_experts=6))
    with pytest.raises(ValueError, match="the model has no routed experts"):
        ParallelDims.from_config({"ep": 2}, 2, SimpleNamespace(n_routed_experts=0))
