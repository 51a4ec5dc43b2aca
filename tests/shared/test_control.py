import numpy as np
import pytest

from shared import adaptive_kl_controller, ema, fixed_kl_controller, tree_map


def test_fixed_controller():
    ctl = fixed_kl_controller(kl_coef=0.1)
    state = ctl.update(ctl.init(), current_kl=100.0, n_steps=64)
    assert state.kl_coef == 0.1


def test_adaptive_controller_golden():
    ctl = adaptive_kl_controller(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 -> error 9/6 - 1 = 0.5, clipped to 0.2: 0.1 * (1 + 0.2 * 256 / 10000).
    state = ctl.update(ctl.init(), current_kl=9.0, n_steps=256)
    assert state.kl_coef == pytest.approx(0.1 * 1.00512)
    # KL 4.5 -> error -0.25, clipped to -0.2: coefficient shrinks.
    state = ctl.update(ctl.init(), current_kl=4.5, n_steps=256)
    assert state.kl_coef == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    # KL 6.6 -> error 0.1 (inside the clip).
    state = ctl.update(ctl.init(), current_kl=6.6, n_steps=1000)
    assert state.kl_coef == pytest.approx(0.1 * 1.01)


def test_adaptive_controller_on_arrays_matches_floats(xp, run):
    ctl = adaptive_kl_controller(init_kl_coef=0.1, target=6.0, horizon=10000)
    expected = ctl.update(ctl.init(), current_kl=9.0, n_steps=256).kl_coef

    def step(kl_coef, current_kl):
        state = ctl.init()._replace(kl_coef=kl_coef)
        return ctl.update(state, current_kl=current_kl, n_steps=256).kl_coef

    out = run.call(step, run.asarray(0.1), run.asarray(9.0))
    assert out == pytest.approx(expected, rel=1e-15)


def test_controller_validation():
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_controller(init_kl_coef=0.1, target=0.0, horizon=1)
    with pytest.raises(ValueError, match="kl_coef"):
        fixed_kl_controller(kl_coef=-1.0)


def test_ema_golden(run):
    # beta 0.9: e = 0.9 * 1 + 0.1 * 3 = 1.2 (DeepSpeed-Chat moving_average semantics).
    averager = ema(beta=0.9)
    params = {"w": run.asarray([1.0, 2.0]), "layers": [run.asarray(1.0), (2.0, 4.0)]}
    state = averager.init(params)
    new_params = {"w": run.asarray([3.0, 2.0]), "layers": [run.asarray(11.0), (2.0, 14.0)]}
    state = averager.update(state, new_params)
    np.testing.assert_allclose(np.asarray(run.call(lambda x: x, state.ema["w"])), [1.2, 2.0])
    assert float(state.ema["layers"][0]) == pytest.approx(2.0)
    assert state.ema["layers"][1] == pytest.approx((2.0, 5.0))
    assert isinstance(state.ema["layers"][1], tuple)


def test_ema_is_pure():
    averager = ema()
    params = {"w": np.ones(2)}
    state = averager.init(params)
    averager.update(state, {"w": np.zeros(2)})
    np.testing.assert_array_equal(state.ema["w"], np.ones(2))


def test_tree_map_structure_mismatch():
    with pytest.raises(ValueError, match="structures differ"):
        tree_map(lambda a, b: a + b, {"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="structures differ"):
        tree_map(lambda a, b: a + b, [1.0, 2.0], [1.0])
