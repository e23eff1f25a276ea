import os
import random
import zlib

import numpy as np
import pytest
import torch

# Two cores on CI: keep each test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU; this must be set before anything
    # imports triton (transformers does), so it lives in the root conftest.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED_ENV = "KIMI_TRAIN_TEST_SEED"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from seeded random, numpy and torch generators, whatever ran before it.

    The seed comes from the test's id (the same choices every run, in any order or subset), or from
    $KIMI_TRAIN_TEST_SEED to try others; a failing test's report shows it (a "random seed" section),
    so `KIMI_TRAIN_TEST_SEED=<seed> pytest <test>` makes the same random choices again.
    """
    seed = int(os.environ.get(SEED_ENV) or zlib.crc32(request.node.nodeid.encode()))
    request.node.user_properties.append(("random seed", seed))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seeds = [value for key, value in item.user_properties if key == "random seed"]
    if report.failed and seeds:
        report.sections.append(("random seed", f"{SEED_ENV}={seeds[0]} makes this test's random choices again"))
