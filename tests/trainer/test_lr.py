"""Learning-rate schedule values against the formulas, step by step."""

import math

import pytest

from fleetlm.trainer.lr import WarmupDecayLR


def rates(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.get_lr())
        scheduler.step()
    return values


def test_warmup_then_cosine():
    lr = rates(WarmupDecayLR(1.0, 0.1, warmup_steps=4, decay_steps=14, kind="cosine"), 16)
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0)
    assert lr[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[14:] == pytest.approx([0.1, 0.1])


def test_linear_decay():
    lr = rates(WarmupDecayLR(2.0, 0.0, warmup_steps=0, decay_steps=4, kind="linear"), 6)
    assert lr == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0])


def test_constant_after_warmup():
    lr = rates(WarmupDecayLR(1.0, 0.0, warmup_steps=2, decay_steps=3, kind="constant"), 5)
    assert lr == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_state_round_trip():
    first = WarmupDecayLR(1.0, 0.1, warmup_steps=3, decay_steps=10, kind="cosine")
    rates(first, 5)
    second = WarmupDecayLR(1.0, 0.1, warmup_steps=3, decay_steps=10, kind="cosine")
    second.set_state_dict(first.state_dict())
    assert rates(second, 4) == rates(first, 4)
