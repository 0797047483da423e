"""The fit timer splits wall time into setup, training and validation."""

import time

from aecompress.training.timing import FitTimer


def test_phases_add_up_and_validation_is_counted_apart():
    from types import SimpleNamespace

    timer = FitTimer()
    time.sleep(0.02)
    timer.on_fit_start(None, None)
    time.sleep(0.02)
    timer.on_validation_start(None, None)
    time.sleep(0.05)
    timer.on_validation_end(None, None)
    start_measurement = SimpleNamespace(start_seconds=0.01)  # e.g. ModelQualityCallback's before-step-0 measure
    timer.on_fit_end(SimpleNamespace(callbacks=[timer, start_measurement]), None)
    p = timer.phases()
    assert p["setup"] >= 0.02 and p["validation"] >= 0.06 and p["training"] >= 0.01
    assert abs(p["setup"] + p["training"] + p["validation"] - p["total"]) < 1e-6
    assert timer.summary().startswith(f"fit took {p['total']:.1f} s")


def test_an_unmatched_validation_end_adds_nothing():
    timer = FitTimer()
    timer.on_validation_end(None, None)
    assert timer.validation == 0.0
