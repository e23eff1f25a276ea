import math

import pytest

from kimi_train.loop.schedule import LRSchedule


def test_warmup_is_linear_from_first_step():
    s = LRSchedule(total_steps=100, warmup_steps=10, type="constant")
    assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert s(10) == s(99) == 1.0


def test_wsd_is_flat_then_decays_to_min_ratio():
    s = LRSchedule(total_steps=100, warmup_steps=10, type="wsd", decay_fraction=0.2, decay_shape="linear",
                   min_lr_ratio=0.1)
    assert all(s(i) == 1.0 for i in range(10, 80))
    assert s(80) == pytest.approx(0.1 + 0.9 * (1 - 1 / 20))
    assert s(99) == pytest.approx(0.1)
    decay = [s(i) for i in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing


def test_wsd_cosine_shape_and_no_decay():
    s = LRSchedule(total_steps=40, warmup_steps=0, type="wsd", decay_fraction=0.5, decay_shape="cosine",
                   min_lr_ratio=0.0)
    assert s(19) == 1.0
    assert s(29) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert s(39) == pytest.approx(0.0, abs=1e-12)
    flat = LRSchedule(total_steps=40, warmup_steps=0, type="wsd", decay_fraction=0.0)
    assert all(flat(i) == 1.0 for i in range(40))


def test_cosine_from_peak_to_min():
    s = LRSchedule(total_steps=110, warmup_steps=10, type="cosine", min_lr_ratio=0.2)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.2 + 0.8 * 0.5)
    assert s(110) == pytest.approx(0.2)


def test_bad_type_is_one_line_error():
    with pytest.raises(ValueError, match="schedule.type='step' is not one of wsd, cosine, constant"):
        LRSchedule(total_steps=10, type="step")
