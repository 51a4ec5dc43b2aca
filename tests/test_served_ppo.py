"""A PPO run whose reward model and initial policy are served (`rlhf serve`, here on threads of
the test process) gives the metrics and weights of the same run in process, on both backends
and across them (a torch actor with JAX servers, and the reverse). Loopback only."""

from __future__ import annotations

import pytest
from served_runs import assert_same_run, config, role_handler, run_ppo


def _served_ppo(backend, server_backend, models, run_dir):
    from shared.serving import ServerThread

    run_config = config()
    with ServerThread(role_handler(server_backend, "reward", models["reward"],
                                   run_config)) as reward, \
            ServerThread(role_handler(server_backend, "initial-policy", models["policy"],
                                      run_config)) as policy:
        return run_ppo(backend, models, run_dir, [f"ppo.reward_model.url={reward.url}",
                                                  f"ppo.initial_policy.url={policy.url}"])


@pytest.mark.parametrize(("backend", "server_backend"), [
    ("torch", "torch"),
    pytest.param("torch", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "jax", marks=pytest.mark.slow),
    pytest.param("jax", "torch", marks=pytest.mark.slow),
])
def test_served_reward_and_initial_policy_give_the_in_process_run(
        served_models, in_process_ppo, tmp_path, backend, server_backend):
    in_process = in_process_ppo(backend)
    served = _served_ppo(backend, server_backend, served_models, tmp_path / "served")
    assert_same_run(in_process, served)
    models = served.entry["models"]
    assert models[0] == "actor" and models[1].startswith("reference@http://127.0.0.1:")
    assert any(m.startswith("reward_model@http://127.0.0.1:") for m in models)
    assert in_process.entry["models"] == ["actor", "reference", "critic", "reward_model"]
