"""Each fault of tests/reliability/faults.py injected once into a real run (CPU): it must be
survived with no step lost. The torchrun fault runs in tests/distributed/test_elastic_restart.py;
`python tests/reliability/faults.py --repeat 5` makes the table of docs/reliability.md."""

from __future__ import annotations

import pytest

import faults

pytestmark = pytest.mark.slow
SINGLE_PROCESS = [name for name in faults.SCENARIOS if name not in faults.MULTI_PROCESS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return faults.reference_records(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_fault_is_survived_and_loses_no_step(name, reference, tmp_path):
    outcome = faults.run_scenario(name, repeat=1, seed=0, workdir=tmp_path, ref=reference)
    assert (outcome.survived, outcome.lost) == (1, 0), outcome
