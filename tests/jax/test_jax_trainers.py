"""The trainers end to end on tiny models: the pipeline's run directory through the `rlhf`
command, the other subcommands, the reward losses and one PPO iteration in detail."""

import functools
import io
import json

import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from jax_tiny_runs import make_context

import shared
from jax_rlhf import cli as jax_cli
from jax_rlhf.params import ModelDef, to_host
from jax_rlhf.train.common import build_model
from jax_rlhf.train.ppo import PPOTrainer
from jax_rlhf.train.reward import RewardOptions, RewardTrainer
from shared.cli import main as rlhf

PPO_METRICS = {
    "actor_loss", "critic_loss", "pg_loss", "clip_fraction", "approx_kl", "value_clip_fraction",
    "entropy", "reward_score", "kl", "kl_coef", "advantages_mean", "returns_mean",
    "response_length", "short_answers", "rollout_logprob_gap", "ptx_loss", "actor_lr",
    "critic_lr", "generation_time", "scoring_time", "training_time", "rollout_path",
}
"""The PPO metric names of docs/architecture.md."""


@pytest.fixture(scope="module")
def pipeline_run(tiny_config, tmp_path_factory):
    """`rlhf pipeline --backend jax` on the tiny config; returns the run directory."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    config = tiny_config(logging={"save_interval": 1}, ppo={"enable_ema": True})
    assert rlhf(["pipeline", "--backend", "jax", "--config", str(config),
                 "--run-dir", str(run_dir)]) == 0
    return run_dir, config


def _records(run_dir, step):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["step"] == step]


def test_pipeline_writes_the_run_directory(pipeline_run):
    run_dir, _ = pipeline_run
    assert (run_dir / "config.yaml").exists()
    assert any((run_dir / "tensorboard").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "jax"
    for step in ("sft", "ppo"):
        assert set(summary[step]["heldout"]) == {"arithmetic_accuracy",
                                                 "arithmetic_accuracy_greedy"}
    assert {"eval_loss", "eval_perplexity"} <= set(summary["sft"])
    assert {"eval_accuracy", "eval_chosen_score", "eval_rejected_score"} <= set(summary["reward"])
    assert np.isfinite(summary["ppo"]["final_reward"]) and np.isfinite(summary["ppo"]["final_kl"])
    assert set(summary["timings"]) == {"sft_wall_time", "reward_wall_time", "ppo_wall_time",
                                       "pipeline_wall_time"}
    for step in ("sft", "reward"):
        assert summary[step]["steps"] == 3
        assert {"training_time", "evaluation_time", "checkpoint_time", "export_time",
                "wall_time"} <= set(summary[step]["timings"])
    for step in ("sft", "reward", "ppo"):
        assert (run_dir / step / "final" / "model.safetensors").exists()
        assert (run_dir / step / "final" / "tokenizer.json").exists()
        assert any((run_dir / step / "checkpoints").iterdir())


def test_pipeline_metric_names(pipeline_run):
    run_dir, _ = pipeline_run
    sft = _records(run_dir, "sft")
    assert {"loss", "lr", "grad_norm", "tokens"} <= set(sft[0])
    assert {"eval_loss", "eval_perplexity"} <= set(sft[-1])
    reward = _records(run_dir, "reward")
    assert {"loss", "accuracy", "chosen_score", "rejected_score", "lr"} <= set(reward[0])
    assert {"eval_accuracy", "eval_chosen_score", "eval_rejected_score"} <= set(reward[-1])
    ppo = _records(run_dir, "ppo")
    assert [r["iteration"] for r in ppo] == [1, 2]
    for record in ppo:
        assert PPO_METRICS <= set(record), PPO_METRICS - set(record)
        assert record["rollout_path"] == "jax_sampler"
        assert record["rollout_logprob_gap"] < 1e-4
        assert record["ptx_loss"] > 0  # unsup_coef 0.5, joint


def test_exported_models_load_in_transformers(pipeline_run):
    """Every final directory carries its tokenizer, generation config (causal LMs) and model
    card, loads with AutoTokenizer and AutoModelFor*, and a causal LM generates."""
    run_dir, _ = pipeline_run
    exports = {"sft/final": "lm", "reward/final": "value", "ppo/final": "lm",
               "ppo/critic": "value", "ppo/ema": "lm"}
    for name, kind in exports.items():
        directory = run_dir / name
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        card = (directory / "README.md").read_text()
        assert "backend `jax`" in card and str(run_dir) in card, card
        if kind == "value":
            rm = transformers.AutoModelForSequenceClassification.from_pretrained(directory)
            assert rm.config.num_labels == 1
            assert not (directory / "generation_config.json").exists()
            continue
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.model_type == "llama"
        assert model.generation_config.eos_token_id == model.config.eos_token_id
        prompt = tokenizer("1 + 1 =", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] > prompt["input_ids"].shape[1]


def test_export_command_rebuilds_the_final_models(pipeline_run, tmp_path):
    run_dir, config = pipeline_run
    assert rlhf(["export", "--backend", "jax", "--config", str(config), "--checkpoint",
                 str(run_dir / "ppo" / "checkpoints"), "--out", str(tmp_path)]) == 0
    for name, final in (("actor", "final"), ("critic", "critic")):
        exported = shared_state(tmp_path / name)
        expected = shared_state(run_dir / "ppo" / final)
        card = (tmp_path / name / "README.md").read_text()
        assert "backend `jax`" in card and "checkpoint step 2" in card, card
        assert exported.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(exported[key], expected[key], err_msg=key)


def shared_state(path):
    from jax_rlhf.models import read_hf_state_dict

    return read_hf_state_dict(path)


def test_eval_command_reproduces_the_sft_heldout_metric(pipeline_run, capsys):
    run_dir, config = pipeline_run
    capsys.readouterr()
    assert rlhf(["eval", "--backend", "jax", "--config", str(config), "--model",
                 str(run_dir / "sft" / "final")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["heldout"] == summary["sft"]["heldout"]  # same weights, same uniforms


def test_eval_command_on_a_reward_model_and_an_sft_ppo_pair(pipeline_run, capsys):
    """`rlhf eval` detects a reward model (rw_eval: chosen vs rejected scores; it ended in a
    CheckpointMismatchError) and compares two policies (prompt_eval), as on torch."""
    run_dir, config = pipeline_run
    capsys.readouterr()
    assert rlhf(["eval", "--backend", "jax", "--config", str(config), "--model",
                 str(run_dir / "reward" / "final")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1])
    assert result["kind"] == "reward" and result["pairs"] >= 1
    assert 0 <= result["pair_accuracy"] <= 1 and "pair accuracy" in out
    assert result["chosen"]["min"] <= result["chosen"]["mean"] <= result["chosen"]["max"]
    assert rlhf(["eval", "--backend", "jax", "--config", str(config),
                 "--model-baseline", str(run_dir / "sft" / "final"),
                 "--model-finetune", str(run_dir / "ppo" / "final")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["heldout"] == {"baseline": summary["sft"]["heldout"],
                                 "finetune": summary["ppo"]["heldout"]}
    lines = out.splitlines()
    assert "expected |" in lines[1] and "baseline |" in lines[2] and "finetune |" in lines[3]


def test_chat_answers_each_line(pipeline_run, capsys, monkeypatch):
    run_dir, config = pipeline_run
    monkeypatch.setattr("sys.stdin", io.StringIO("1+2=\n3+4=\n\nquit\n5+5=\n"))
    capsys.readouterr()
    assert rlhf(["chat", "--backend", "jax", "--config", str(config), "--model",
                 str(run_dir / "ppo" / "final")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # banner, two turns with their answers, the empty line (ignored), quit; 5+5= never read
    assert lines[0].startswith("chat:") and len(lines) == 7
    assert [lines[i] for i in (1, 3, 5, 6)] == ["you> 1+2=", "you> 3+4=", "you> ", "you> quit"]


def test_parity_and_bench_are_not_backend_commands():
    # `rlhf parity` and `rlhf bench` run parity_tests/ and bench/ themselves (shared.cli).
    for command in ("parity", "bench"):
        with pytest.raises(ValueError, match=f"rlhf {command}. compares or measures both"):
            jax_cli.run(command, None, None)


# -- reward losses --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_batch():
    """A value-head model and 4 comparisons in the `[N, K, L]` layout of `batch_arrays`."""
    model = build_model("value_head", hf_config={**_tiny_llama()}, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32, (4, 2, 8)).astype(np.int32)
    ids[:, 1, :3] = ids[:, 0, :3]  # shared prompt
    lengths = np.array([[8, 6], [5, 7], [6, 6], [4, 8]])
    mask = (np.arange(8)[None, None, :] < lengths[..., None]).astype(np.int32)
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "num_valid": np.full((4,), 2, np.int32)}
    return model, jax.tree.map(jax.numpy.asarray, batch)


def _tiny_llama():
    from jax_tiny_runs import TINY_LLAMA

    return TINY_LLAMA


def _reward_loss(model, batch, loss, margin=None):
    options = RewardOptions(loss, margin, 0, 0)
    return _jit_loss_and_stats(options, model, batch)


@functools.partial(nnx.jit, static_argnums=0)
def _jit_loss_and_stats(options, model, batch):
    return RewardTrainer._loss_and_stats(options, model, batch)


def test_kway_on_pairs_equals_bradley_terry(reward_batch):
    model, batch = reward_batch
    bt = _reward_loss(model, batch, "bradley_terry")
    kway = _reward_loss(model, batch, "kway")
    np.testing.assert_allclose(kway[0], bt[0], rtol=1e-6)
    np.testing.assert_array_equal(kway[1], bt[1])


def test_bradley_terry_margin_and_dschat_losses(reward_batch):
    model, batch = reward_batch
    loss, correct, chosen, rejected = _reward_loss(model, batch, "bradley_terry", margin=0.5)
    expected, _ = shared.bradley_terry_loss(chosen, rejected, margin=0.5)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    values, _ = nnx.jit(lambda m, i, a: m(i, a))(
        model, batch["input_ids"].reshape(8, 8), batch["attention_mask"].reshape(8, 8)
    )
    values = np.asarray(values).reshape(4, 2, 8)
    last = batch["attention_mask"].sum(-1) - 1  # right padding: the last real token
    np.testing.assert_allclose(chosen, values[np.arange(4), 0, last[:, 0]], rtol=1e-6)
    dschat = _reward_loss(model, batch, "dschat")
    expected, _ = shared.dschat_pairwise_loss(
        values[:, 0], values[:, 1], np.asarray(batch["input_ids"][:, 0]),
        np.asarray(batch["input_ids"][:, 1]), pad_token_id=0,
    )
    np.testing.assert_allclose(dschat[0], expected, rtol=1e-5)


# -- one PPO iteration in detail ------------------------------------------------------------

@pytest.fixture(scope="module")
def ppo_trainer(tiny_config, tmp_path_factory):
    config = tiny_config(ppo={
        "gradient_accumulation_steps": 2, "max_iterations": 2, "enable_ema": True,
        "ema_beta": 0.9, "ptx_mode": "separate",
        "conventions": {"kl_controller": "adaptive", "kl_target": 0.01, "kl_horizon": 100.0},
    })
    ctx = make_context(config, tmp_path_factory.mktemp("ppo") / "run")
    return PPOTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx)


def test_generate_experience(ppo_trainer):
    tr = ppo_trainer
    prompts = tr.prompt_iterator.next_batch()
    exp = tr.generate_experience(prompts, iteration=0, batch_index=0)
    again = tr.generate_experience(prompts, iteration=0, batch_index=0)
    other = tr.generate_experience(prompts, iteration=1, batch_index=0)
    rows, steps = 8, tr.config.data.max_answer_seq_len
    assert exp.response.shape == exp.sample_mask.shape == (rows, steps)
    assert exp.scores.shape == (rows,) and np.isfinite(exp.scores).all()
    np.testing.assert_array_equal(exp.response, again.response)
    assert not np.array_equal(exp.response, other.response)
    np.testing.assert_allclose(exp.logprobs, exp.ref_logprobs, atol=1e-6)  # step 0
    assert exp.logprob_gap < 1e-4
    short = exp.sample_mask.sum(-1) < tr.config.ppo.min_answer_tokens
    np.testing.assert_array_equal(exp.is_short, short)
    assert (exp.response_mask[short] == 0).all()


def test_train_iteration_updates_ema_kl_and_counts_steps(ppo_trainer):
    tr = ppo_trainer
    before = to_host(tr.actor_state.params)
    actor_steps, critic_steps = int(tr.actor_state.step), int(tr.critic_state.step)
    kl_before = tr.kl_state
    metrics = tr.train_iteration()
    assert PPO_METRICS <= set(metrics)
    # one PPO step (2 accumulated mini-batches) and DeepSpeed-Chat's separate ptx step
    assert int(tr.actor_state.step) == actor_steps + 2
    assert int(tr.critic_state.step) == critic_steps + 1
    assert metrics["ptx_loss"] > 0
    after = to_host(tr.actor_state.params)
    ema = to_host(tr.ema_params)
    expected = shared.ema(beta=0.9).update(shared.EmaState(before), after).ema
    for name in ema:
        np.testing.assert_allclose(ema[name], expected[name], rtol=1e-6, atol=1e-7)
    controller = shared.make_kl_controller(tr.conventions)
    expected_kl = controller.update(kl_before, current_kl=metrics["kl"], n_steps=8)
    np.testing.assert_allclose(tr.kl_state.kl_coef, expected_kl.kl_coef, rtol=1e-6)
    assert tr.kl_state.kl_coef != kl_before.kl_coef


def test_reference_model_is_the_initial_actor(ppo_trainer):
    tr = ppo_trainer
    fresh = ModelDef.split(build_model("causal_lm", hf_config=tr.config.model.actor_config,
                                       seed=tr.config.seed))[1]
    for name, value in to_host(tr.ref_params).items():
        np.testing.assert_array_equal(value, np.asarray(fresh[name]), err_msg=name)


def test_offloaded_reference_scores_the_same(ppo_trainer, tmp_path, monkeypatch):
    """`offload_reference_model` keeps the reference in pinned host memory (forced on here;
    on CPU the trainer would skip it) and streams it to the device inside the scoring jit."""
    from jax_rlhf import sharding

    monkeypatch.setattr(sharding, "offload_supported", lambda: True)
    ctx = make_context(ppo_trainer.ctx.run_dir.parent / "run" / "config.yaml", tmp_path / "off",
                       "ppo.offload_reference_model=true")
    offloaded = PPOTrainer(ctx.config, run_dir=ctx.run_dir, ctx=ctx)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(offloaded.ref_params)}
    assert kinds == {"pinned_host"} and offloaded.spec.reference_on_host
    prompts = offloaded.prompt_iterator.next_batch()
    exp = offloaded.generate_experience(prompts, iteration=5)
    np.testing.assert_allclose(exp.ref_logprobs, exp.logprobs, atol=1e-6)


def test_a_non_finite_step_reaches_no_weight(ppo_trainer):
    """A NaN advantage makes every actor gradient NaN: the jitted step keeps the actor's train
    state (parameters, optimiser state, step counter) and reports a NaN gradient norm; the
    critic, whose loss has no advantage in it, trains."""
    tr = ppo_trainer
    experience = tr.with_advantages([tr.generate_experience(tr.prompt_iterator.next_batch())])
    rows = np.arange(tr.minibatch_rows)
    micro = [experience.train_arrays(rows), experience.train_arrays(rows)]
    micro[1]["advantages"][0, 0] = np.nan
    actor, critic_step = to_host(tr.actor_state), int(tr.critic_state.step)
    stats = tr.train_step(micro, normalizers=[10.0] * 2, ptx=None,
                          ptx_normalizers=None, kl_coef=0.1)
    assert np.isnan(stats["actor_grad_norm"]) and np.isfinite(stats["critic_grad_norm"])
    for a, b in zip(jax.tree.leaves(actor), jax.tree.leaves(to_host(tr.actor_state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(tr.critic_state.step) == critic_step + 1
