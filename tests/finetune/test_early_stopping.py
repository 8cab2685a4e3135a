"""EarlyStopping on scripted metric sequences."""

import pytest

from gptforge.finetune import EarlyStopping


def run(stopper: EarlyStopping, values, interval: int = 10):
    """Feed values at steps interval, 2 * interval, ...; the step at which it said stop (or None)."""
    for i, value in enumerate(values, 1):
        if stopper.update(value, i * interval):
            return i * interval
    return None


def test_min_mode_stops_after_patience_evaluations_without_improvement():
    stopper = EarlyStopping(patience=2, mode="min")
    assert run(stopper, [1.0, 0.8, 0.9, 0.85, 0.7]) == 40  # 0.9 and 0.85 fail to beat 0.8
    assert stopper.best == 0.8 and stopper.best_step == 20


def test_an_improvement_resets_the_count():
    stopper = EarlyStopping(patience=2, mode="min")
    assert run(stopper, [1.0, 1.1, 0.9, 1.0, 0.95, 1.2]) == 50
    assert stopper.best_step == 30


def test_max_mode_and_min_delta():
    stopper = EarlyStopping(patience=2, mode="max", min_delta=0.05)
    # 0.62 and 0.64 are not 0.05 better than 0.6: they do not count as improvements.
    assert run(stopper, [0.5, 0.6, 0.62, 0.64, 0.9]) == 40
    assert (stopper.best, stopper.best_step) == (0.6, 20)


def test_improved_flags_each_new_best():
    stopper = EarlyStopping(patience=None, mode="max")
    flags = []
    for step, value in enumerate([0.1, 0.3, 0.2, 0.4], 1):
        stopper.update(value, step)
        flags.append(stopper.improved)
    assert flags == [True, True, False, True]


def test_without_patience_it_never_stops():
    stopper = EarlyStopping(patience=None, mode="min")
    assert run(stopper, [1.0] + [2.0] * 50) is None
    assert stopper.best_step == 10


def test_state_round_trip_continues_the_count():
    first = EarlyStopping(patience=3, mode="min")
    run(first, [1.0, 2.0, 2.0])
    second = EarlyStopping(patience=3, mode="min")
    second.load_state_dict(first.state_dict())
    assert second.update(3.0, 40) is True and second.best_step == 10


def test_bad_mode():
    with pytest.raises(ValueError):
        EarlyStopping(patience=1, mode="up")
