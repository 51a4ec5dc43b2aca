"""`--resume` reproduces an uninterrupted run exactly: a run killed (an injected exception)
after its checkpoint at step k and resumed logs bitwise the losses of a run never stopped:
SFT and the reward model write metrics.jsonl row for row as an uninterrupted run."""

import json

import jax
import numpy as np
import pytest
from jax_tiny_runs import make_context

from jax_rlhf.checkpoint import DirectoryCheckpointer, read_checkpoint
from jax_rlhf.models import read_hf_state_dict
from jax_rlhf.params import to_host
from jax_rlhf.train.ppo import PPOTrainer
from jax_rlhf.train.reward import RewardTrainer
from jax_rlhf.train.sft import SFTTrainer
from jax_rlhf.train.supervised import SupervisedTrainer


class Crash(RuntimeError):
    pass


def _crash_at(ctx, step: str, index: int) -> None:
    """Makes the run's logger raise when `step` logs `index`: the process 'dies' after the
    checkpoints written before that point."""
    log = ctx.logger.log

    def dying_log(name, i, metrics, **kwargs):
        if name == step and i == index:
            raise Crash(f"killed at {step} {index}")
        return log(name, i, metrics, **kwargs)

    ctx.logger.log = dying_log


def _losses(run_dir, step, keys):
    """`{index: values}` of the step's records; a repeated index (a resumed run that logged
    again what it had logged before the kill) is an error: the file must read row for row as
    an uninterrupted run's."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["step"] == step and keys[0] in r]
    indices = [r["iteration"] for r in records]
    assert indices == sorted(set(indices)), indices
    return {r["iteration"]: [r[k] for k in keys] for r in records}


def _resume_matches(make_trainer, run, tmp_path, *, step, crash_at, keys):
    ctx = make_context(*run(tmp_path / "straight"))
    straight = make_trainer(ctx)
    straight.run()
    ctx = make_context(*run(tmp_path / "killed"))
    _crash_at(ctx, step, crash_at)
    with pytest.raises(Crash):
        make_trainer(ctx).run()
    ctx = make_context(*run(tmp_path / "killed"))  # a new process: everything rebuilt
    resumed = make_trainer(ctx)
    resumed.run(resume=True)
    expected = _losses(tmp_path / "straight", step, keys)
    got = _losses(tmp_path / "killed", step, keys)
    assert sorted(got) == sorted(expected) and len(expected) >= crash_at
    for index in expected:  # bitwise: the same floats written to metrics.jsonl
        assert got[index] == expected[index], index
    return straight, resumed


def _rows(run_dir) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time" and not k.endswith("_time")}
            for x in lines]


@pytest.mark.parametrize("trainer_cls", [SFTTrainer, RewardTrainer], ids=["sft", "reward"])
def test_supervised_resume_is_exact(trainer_cls, tiny_config, tmp_path, monkeypatch):
    step = trainer_cls.step
    config = tiny_config(**{step: {"max_steps": 5, "eval_interval": 2}},
                         logging={"save_interval": 2}, eval={"metric": "none"})

    def trainer(run_dir):
        ctx = make_context(config, run_dir)  # a new process: everything rebuilt
        return trainer_cls(ctx.config, run_dir=ctx.run_dir, ctx=ctx)

    straight = trainer(tmp_path / "straight")
    straight.run()
    killed = tmp_path / "killed"
    calls = {"n": 0}
    original = SupervisedTrainer.train_step

    def dies_in_step_4(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash("killed in step 4")
        return original(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(SupervisedTrainer, "train_step", dies_in_step_4)
        with pytest.raises(Crash):
            trainer(killed).run()
    assert (killed / step / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert [r["iteration"] for r in _rows(killed)] == [1, 2, 2, 3]
    resumed = trainer(killed)
    resumed.run(resume=True)

    expected = _rows(tmp_path / "straight")
    assert [r["iteration"] for r in expected] == [1, 2, 2, 3, 4, 4, 5, 5]
    assert _rows(killed) == expected  # bitwise: the same floats, row for row
    for name, value in to_host(straight.state.params).items():
        np.testing.assert_array_equal(to_host(resumed.state.params)[name], value)
    final = read_hf_state_dict(killed / step / "final")
    for name, value in read_hf_state_dict(tmp_path / "straight" / step / "final").items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)
    assert resumed.iterator.state_dict() == straight.iterator.state_dict()
    state, meta, index = read_checkpoint(killed / step / "checkpoints")
    assert index == 5 and meta["loop"]["global_step"] == 5 and "model" in meta["models"]


def test_ppo_resume_is_exact(tiny_config, tmp_path):
    """PPO holds the most state: both optimisers, the EMA, the adaptive KL coefficient, the
    prompt and ptx iterators; sampling is keyed by the iteration."""
    config = tiny_config(
        ppo={"max_iterations": 3, "enable_ema": True, "unsup_coef": 0.5,
             "conventions": {"kl_controller": "adaptive", "kl_target": 0.01,
                             "kl_horizon": 100.0}},
        logging={"save_interval": 1},
    )

    def run(run_dir):
        return config, run_dir

    keys = ("actor_loss", "critic_loss", "reward_score", "kl", "kl_coef", "ptx_loss")
    straight, resumed = _resume_matches(
        lambda ctx: PPOTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx), run, tmp_path,
        step="ppo", crash_at=3, keys=keys
    )
    assert resumed.kl_state.kl_coef == straight.kl_state.kl_coef
    for tree in ("actor", "critic", "ema"):
        a = jax.tree.leaves(to_host(resumed._state_tree()[tree]))
        b = jax.tree.leaves(to_host(straight._state_tree()[tree]))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_checkpoint_directories_keep_the_latest_complete(tmp_path):
    """`shared.checkpoints` names, completes and prunes; `DirectoryCheckpointer` writes each
    orbax tree in the background; `read_checkpoint` (rlhf export) reads the newest complete."""
    from shared.checkpoints import CheckpointDir

    directory = CheckpointDir(tmp_path / "ckpts", keep=2, prefix="iter")
    ckpt = DirectoryCheckpointer(async_save=True)
    for step in (1, 2, 3):
        path = directory.prepare(directory.tag(step))
        ckpt.save(path, {"w": np.full((2,), step, np.float32)}, {"step": step})
        ckpt.wait()
        directory.commit(path)
    partial = directory.prepare(directory.tag(4))  # a save killed before it completed
    ckpt.save(partial, {"w": np.zeros((2,), np.float32)}, {"step": 4})
    ckpt.close()
    state, meta, step = read_checkpoint(tmp_path / "ckpts")
    assert step == 3 and meta == {"step": 3}
    np.testing.assert_array_equal(state["w"], [3, 3])
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["iter-00000002", "iter-00000003", "iter-00000004"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        read_checkpoint(partial)
