"""Rolling windows by items and by time, and alerts: once per crossing, re-armed below the threshold."""

import pytest

from gptforge.monitor.windows import WindowTracker

LABELS = ["neg", "pos"]


def tracker(**kw):
    settings = dict(window_items=None, window_seconds=None, min_items=1, hysteresis=0.0)
    settings.update(kw)
    return WindowTracker(LABELS, kw.pop("rules", []), **{k: v for k, v in settings.items() if k != "rules"})


def test_window_by_items_keeps_the_last_n_per_key():
    t = tracker(window_items=3)
    seen = [t.add("A", i, label) for i, label in enumerate(["neg", "neg", "pos", "pos", "pos"])]
    assert [n for n, _, _ in seen] == [1, 2, 3, 3, 3]
    assert seen[2][1] == pytest.approx({"neg": 2 / 3, "pos": 1 / 3})
    assert seen[3][1] == pytest.approx({"neg": 1 / 3, "pos": 2 / 3})
    assert seen[4][1] == {"neg": 0.0, "pos": 1.0}
    n, shares, _ = t.add("B", 0, "neg")  # keys are separate
    assert n == 1 and shares == {"neg": 1.0, "pos": 0.0}


def test_window_by_time_keeps_the_items_of_the_last_t_seconds_by_item_time():
    t = tracker(window_seconds=600)
    assert t.add("A", 1000, "neg")[0] == 1
    assert t.add("A", 1300, "pos")[0] == 2
    assert t.add("A", 1599, "pos")[0] == 3   # 1000 is 599 s before: still in
    n, shares, _ = t.add("A", 1600, "pos")    # 1000 is now 600 s old: out
    assert n == 3 and shares == {"neg": 0.0, "pos": 1.0}
    n, _, _ = t.add("A", 1100, "neg")         # late, out of order, but within the window of the newest (1600)
    assert n == 4
    n, shares, _ = t.add("A", 2300, "neg")    # 700 s later: everything before 1700 leaves
    assert n == 1 and shares == {"neg": 1.0, "pos": 0.0}


def test_items_and_time_together_take_the_smaller_window():
    t = tracker(window_items=2, window_seconds=100)
    t.add("A", 0, "neg")
    t.add("A", 10, "neg")
    assert t.add("A", 20, "pos")[0] == 2      # the item limit
    assert t.add("A", 500, "pos")[0] == 1     # the time limit


def test_alert_fires_once_per_crossing_and_rearms_below_the_threshold():
    t = tracker(window_items=4, rules=[("neg", 0.5)], min_items=2)
    fired = [bool(t.add("A", i, label)[2]) for i, label in enumerate(
        ["neg",            # 1 item: below min_items, no alert although the share is 1.0
         "pos",            # 1/2 = 0.5 reaches 0.5: fires
         "neg", "neg",     # still above: no second alert
         "pos", "pos",     # [p n n p], [n n p p]: 0.5, at the threshold, not below it: still disarmed
         "pos",            # [n p p p]: 0.25, below: re-armed (no alert)
         "neg",            # [p p p n]: 0.25
         "neg",            # [p p n n]: 0.5: fires again
         ])]
    assert fired == [False, True, False, False, False, False, False, False, True]
    alert = t.add("B", 0, "neg")  # another key has its own arm state... but needs min_items
    assert alert[2] == []
    assert t.add("B", 1, "neg")[2] == [("neg", 1.0, 0.5)]


def test_hysteresis_rearms_only_well_below_the_threshold():
    t = tracker(window_items=10, rules=[("neg", 0.5)], hysteresis=0.2)
    labels = ["neg", "pos", "pos",   # 1.0 fires; then 0.5, 0.33 (not below 0.3: stays disarmed)
              "neg",                 # 0.5: no alert, not re-armed
              "pos", "pos", "pos",   # 0.4, 0.33, 0.29 < 0.3: re-armed
              "neg", "neg"]          # 0.375, 0.44... then
    fired = [bool(t.add("A", i, label)[2]) for i, label in enumerate(labels)]
    assert fired == [True] + [False] * 8
    assert t.add("A", 9, "neg")[2] == [("neg", 0.5, 0.5)]  # 5/10: fires again after re-arming


def test_state_round_trip_continues_as_if_never_stopped():
    stream = [("A", i * 30, ["neg", "pos", "neg", "neg", "pos"][i % 5]) for i in range(40)]
    stream += [("B", i * 45, ["pos", "neg"][i % 2]) for i in range(20)]

    def run(t, items):
        return [t.add(*x) for x in items]

    kw = dict(window_items=7, window_seconds=400, rules=[("neg", 0.6), ("pos", 0.5)], min_items=3, hysteresis=0.1)
    whole = run(tracker(**kw), stream)
    first = tracker(**kw)
    head = run(first, stream[:23])
    import json

    second = tracker(**kw)
    second.load_state(json.loads(json.dumps(first.to_state())))
    assert head + run(second, stream[23:]) == whole
    assert any(fired for _, _, fired in whole)
