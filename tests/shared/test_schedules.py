import numpy as np
import pytest

from shared import constant_schedule, cosine_schedule, linear_schedule, make_schedule

BASE_LR, WARMUP, TOTAL = 1e-3, 4, 20
STEPS = list(range(TOTAL + 4))  # past the end too (cosine turns back up, linear stays 0)


def _transformers_lrs(name, **kwargs):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = transformers.get_scheduler(name, optimizer, **kwargs)
    lrs = []
    for _ in STEPS:
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_matches_transformers_get_scheduler(name):
    expected = _transformers_lrs(name, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    schedule = make_schedule(name, base_lr=BASE_LR, warmup_steps=WARMUP, total_steps=TOTAL)
    np.testing.assert_allclose([schedule(s) for s in STEPS], expected, rtol=1e-12, atol=1e-18)


def test_cosine_min_lr_matches_transformers():
    expected = _transformers_lrs(
        "cosine_with_min_lr",
        num_warmup_steps=WARMUP,
        num_training_steps=TOTAL,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    schedule = make_schedule(
        "cosine", base_lr=BASE_LR, warmup_steps=WARMUP, total_steps=TOTAL, min_lr_ratio=0.1
    )
    np.testing.assert_allclose([schedule(s) for s in STEPS], expected, rtol=1e-12)


def test_golden_values():
    linear = linear_schedule(base_lr=1.0, warmup_steps=2, total_steps=10)
    assert [linear(s) for s in (0, 1, 2, 6, 10, 12)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    cosine = cosine_schedule(base_lr=1.0, warmup_steps=0, total_steps=10)
    assert cosine(5) == pytest.approx(0.5)  # half-way down the half cosine
    assert constant_schedule(base_lr=2.0, warmup_steps=4)(1) == 0.5
    floor = linear_schedule(base_lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
    assert floor(10) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_array_steps_match_python_ints(run, name):
    schedule = make_schedule(name, base_lr=BASE_LR, warmup_steps=WARMUP, total_steps=TOTAL)
    steps = run.asarray(np.asarray(STEPS))  # integer array; one jitted call for all steps
    out = run.call(schedule, steps)
    np.testing.assert_allclose(out, [schedule(s) for s in STEPS], rtol=1e-15, atol=1e-20)


def test_unknown_name():
    with pytest.raises(ValueError, match="cosine"):
        make_schedule("polynomial", base_lr=1.0)
