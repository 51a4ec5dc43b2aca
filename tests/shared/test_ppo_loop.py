"""`shared.ppo_loop` on a numpy backend: what the loop itself decides (normalisers per
convention, the pad-token mask, the trimmed answer width, the short-answer rules, the KL
controller, resume) without any model framework."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.config import config_from_dict, load_config, to_dict
from shared.experience import Experience
from shared.ppo_loop import PPOLoop
from shared.ppo_step import compute_advantages
from shared.runlog import RunLogger

REPO = Path(__file__).resolve().parents[2]
EOS, PAD = 2, 0


def _config(tmp_path, **ppo):
    base = to_dict(load_config(REPO / "configs" / "demo.yaml"))
    base["data"]["cache_dir"] = str(tmp_path / "cache")
    base["ppo"] = {**base["ppo"], "per_device_generation_batch_size": 4,
                   "per_device_training_batch_size": 2, "generation_batches": 2,
                   "ppo_epochs": 2, "max_iterations": 3, "unsup_coef": 0.0,
                   "gradient_accumulation_steps": 2, "min_answer_tokens": 2,
                   **{k: v for k, v in ppo.items() if k not in ("conventions", "guard")}}
    base["guard"] = {**base.get("guard", {}), **ppo.get("guard", {})}
    conventions = {**base["ppo"]["conventions"], **ppo.get("conventions", {})}
    if "preset" in ppo:
        from shared.presets import get_preset

        conventions = {**to_dict(get_preset(ppo["preset"])), **ppo.get("conventions", {})}
    base["ppo"]["conventions"] = conventions
    base["logging"] = {**base["logging"], "progress_bar": False, "enable_tensorboard": False,
                       "save_interval": 1}
    base["eval"] = {**base["eval"], "metric": "none"}
    return config_from_dict(base)


class NumpyPPO(PPOLoop):
    """A deterministic stand-in for a backend: answers and scores follow from the uniforms
    and one weight `w` that every optimiser step moves by the step's advantage sum."""

    def __init__(self, config, run_dir, *, lengths=None, eos=EOS):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(REPO / "configs/demo/tokenizer"))
        self.is_main, self.rollout_path = True, "numpy"
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run_logger = RunLogger(run_dir, enable_tensorboard=False)
        self._init_loop(config, run_dir, tokenizer=self.tokenizer, world_size=1, pad_token_id=PAD)
        self.lengths, self.eos = lengths, eos
        self.w = 0.0
        self.calls: list[dict] = []

    def generate(self, prompt_ids, prompt_mask, uniforms):
        rows, width = uniforms.shape
        tokens = 3 + (uniforms * 20).astype(np.int64)
        length = (self.lengths if self.lengths is not None
                  else 1 + (uniforms[:, 0] * width).astype(np.int64) % width)
        t = np.arange(width)[None, :]
        tokens = np.where(t == length[:, None] - 1, self.eos, tokens)
        tokens = np.where(t >= length[:, None], PAD, tokens)
        mask = (t < length[:, None]).astype(np.int64)
        return tokens, mask, np.log(uniforms + 0.5) * mask

    def score(self, prompt_ids, prompt_mask, response, sample_mask):
        logprobs = np.log((response % 7 + 1) / 8.0) - 0.01 * self.w
        return {"logprobs": logprobs, "ref_logprobs": np.log((response % 5 + 1) / 6.0),
                "values": 0.1 * response + self.w,
                "scores": (response * sample_mask).sum(1) / 10.0 + self.w}

    def train_step(self, micro_batches, *, normalizers, ptx, ptx_normalizers, kl_coef):
        self.calls.append({"normalizers": list(normalizers),
                           "rows": [m["response"].copy() for m in micro_batches]})
        loss = sum(float((m["advantages"] * m["response_mask"]).sum()) / max(n, 1.0)
                   for m, n in zip(micro_batches, normalizers, strict=True))
        self.w -= 0.1 * loss
        tokens = sum(float(m["response_mask"].sum()) for m in micro_batches)
        return {"actor_loss": loss, "critic_loss": loss ** 2, "pg_loss": loss, "tokens": tokens,
                "clip_fraction": 0.5 * tokens, "actor_lr": 1e-3, "critic_lr": 2e-3}

    def ptx_step(self, ptx, *, ptx_normalizers):
        raise AssertionError("no ptx here")

    def update_ema(self):
        pass

    saves_in_background = False

    def barrier(self):
        pass

    def wait_until_saved(self):
        pass

    def save_checkpoint(self, path, state):
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps({"w": self.w, "state": state}))

    def load_checkpoint(self, path):
        data = json.loads((path / "state.json").read_text())
        self.w = data["w"]
        return data["state"]

    def export(self, step_dir):
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / "final.json").write_text(json.dumps({"w": self.w}))
        return {"final_model": str(step_dir / "final.json")}

    def heldout_metrics(self, model):
        return {}


def _records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k != "time" and not k.endswith("_time")})
    return out


def test_global_normaliser_is_the_step_token_count(tmp_path):
    loop = NumpyPPO(_config(tmp_path), tmp_path / "run")
    loop.train_iteration()
    for call in loop.calls:
        assert len(set(call["normalizers"])) == 1  # one count for the whole step
    assert len(loop.calls) == 4  # 8 rows x 2 epochs / (2 rows x 2 micro-batches)


def test_micro_batch_mean_normalisers_are_each_micro_batch_count(tmp_path):
    loop = NumpyPPO(_config(tmp_path, conventions={"accumulation_scaling": "micro_batch_mean"}),
                    tmp_path / "run")
    buffer = [loop.generate_experience(loop.prompt_iterator.next_batch(), batch_index=b)
              for b in range(2)]
    loop.train_on_experience(buffer)
    experience = Experience.cat(buffer)
    by_tokens = {tuple(r): m for r, m in zip(experience.response.tolist(),
                                             experience.response_mask, strict=True)}
    for call in loop.calls:
        for rows, normalizer in zip(call["rows"], call["normalizers"], strict=True):
            tokens = sum(by_tokens[tuple(r)].sum() for r in rows.tolist())
            assert normalizer == pytest.approx(tokens * 2)  # x accumulation steps


def test_mask_pad_tokens_masks_an_eos_that_is_the_pad(tmp_path):
    lengths = np.array([3, 4, 2, 4])
    plain = NumpyPPO(_config(tmp_path), tmp_path / "a", lengths=lengths, eos=PAD)
    exp = plain.generate_experience(plain.prompt_iterator.next_batch())
    np.testing.assert_array_equal(exp.sample_mask.sum(1), lengths)  # EOS counted
    dschat = NumpyPPO(_config(tmp_path, conventions={"mask_pad_tokens": True}), tmp_path / "b",
                      lengths=lengths, eos=PAD)
    exp = dschat.generate_experience(dschat.prompt_iterator.next_batch())
    np.testing.assert_array_equal(exp.sample_mask.sum(1), lengths - 1)  # EOS == pad: masked


def test_trimmed_width_computes_each_batch_on_its_longest_answer(tmp_path):
    config = _config(tmp_path, preset="deepspeed_chat")
    assert config.ppo.conventions.trim_answer_width
    loop = NumpyPPO(config, tmp_path / "run", lengths=np.array([3, 1, 2, 3]))
    exp = loop.generate_experience(loop.prompt_iterator.next_batch())
    scored = loop.with_advantages([exp])
    width = 3  # the longest answer
    out = compute_advantages(exp.scores, exp.logprobs[:, :width], exp.ref_logprobs[:, :width],
                             exp.values[:, :width], exp.response_mask[:, :width],
                             conventions=config.ppo.conventions, kl_coef=0.1)
    np.testing.assert_allclose(scored.advantages[:, :width], out["advantages"], rtol=1e-6)
    assert not scored.advantages[:, width:].any()
    # the full width puts the longest rows' score one slot later: different advantages
    full = compute_advantages(exp.scores, exp.logprobs, exp.ref_logprobs, exp.values,
                              exp.response_mask, conventions=config.ppo.conventions, kl_coef=0.1)
    assert not np.allclose(full["advantages"][:, :width], out["advantages"])


def test_dschat_short_answer_rule(tmp_path):
    config = _config(tmp_path, short_answer_policy="dschat", min_answer_tokens=3)
    loop = NumpyPPO(config, tmp_path / "run", lengths=np.array([1, 2, 1, 2]))
    with pytest.raises(RuntimeError, match="no earlier valid rollout"):
        loop.generate_experience(loop.prompt_iterator.next_batch())
    loop.lengths = np.array([4, 2, 3, 1])
    first = loop.generate_experience(loop.prompt_iterator.next_batch(), batch_index=0)
    np.testing.assert_array_equal(first.is_short, [False, True, False, True])
    assert first.short_answers == 2 and not first.response_mask[1].any()
    loop.lengths, loop.w = np.array([1, 1, 2, 1]), 1.0
    again = loop.generate_experience(loop.prompt_iterator.next_batch(), batch_index=1)
    assert again.short_answers == 4  # the short answers generated are still counted
    np.testing.assert_array_equal(again.response, first.response)  # the last valid rollout
    np.testing.assert_allclose(again.scores, first.scores + 1.0)  # scored at today's weights


def test_kl_controller_is_updated_once_per_iteration_from_the_valid_rows(tmp_path):
    config = _config(tmp_path, conventions={"kl_controller": "adaptive", "kl_target": 0.5,
                                            "kl_horizon": 10.0})
    loop = NumpyPPO(config, tmp_path / "run")
    controller_state = loop.kl_state
    metrics = loop.train_iteration()
    expected = loop.kl_controller.update(controller_state, current_kl=metrics["kl"],
                                         n_steps=8 - metrics["short_answers"])
    assert loop.kl_state.kl_coef == pytest.approx(float(expected.kl_coef))
    assert metrics["kl_coef"] == pytest.approx(float(controller_state.kl_coef))
    assert metrics["clip_fraction"] == pytest.approx(0.5)  # token statistics per token


@pytest.mark.parametrize("kill_after", [1, 2])
def test_resumed_metrics_equal_an_uninterrupted_run_row_for_row(tmp_path, kill_after):
    config = _config(tmp_path, short_answer_policy="dschat")
    straight = NumpyPPO(config, tmp_path / "straight")
    straight.run()

    class Killed(Exception):
        pass

    killed = NumpyPPO(config, tmp_path / "killed")
    original = killed.train_on_experience

    def dying(buffer, **kwargs):
        if killed.iteration == kill_after:  # after the checkpoint of `kill_after`
            killed.run_logger.log("ppo", 99, {"stray": 1.0})  # a record the resume drops
            raise Killed
        return original(buffer, **kwargs)

    killed.train_on_experience = dying
    with pytest.raises(Killed):
        killed.run()
    resumed = NumpyPPO(config, tmp_path / "killed")
    resumed.run(resume=True)
    assert _records(tmp_path / "killed") == _records(tmp_path / "straight")
    assert resumed.w == straight.w
    assert resumed.kl_state == straight.kl_state
    kept = sorted(p.name for p in (tmp_path / "killed" / "ppo" / "checkpoints").iterdir())
    assert kept == ["iter-00000002", "iter-00000003"]  # logging.keep_checkpoints: 2
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())["ppo"]
    assert summary["iterations"] == 3 and summary["final_model"].endswith("final.json")


def test_trimmed_width_with_pad_eos_keeps_the_eos_column(tmp_path):
    """pad == EOS: the EOS leaves the mask, but DeepSpeed-Chat's `generate` still returned its
    column, so the width (and the longest row's score slot, its EOS) counts it."""
    config = _config(tmp_path, preset="deepspeed_chat")
    loop = NumpyPPO(config, tmp_path / "run", lengths=np.array([3, 1, 2, 3]), eos=PAD)
    exp = loop.generate_experience(loop.prompt_iterator.next_batch())
    assert exp.answer_width == 3 and exp.sample_mask.sum(1).max() == 2
    scored = loop.with_advantages([exp])
    score_slot = np.argmax(np.abs(scored.token_rewards[0]))
    assert score_slot == 2  # the EOS slot, one past the last real token


class NaNPPO(NumpyPPO):
    """Scores NaN in iterations `nan_scores`; gradient norms NaN in iterations `nan_steps`
    (1-based), where, as the backends do, the step is not applied."""

    def __init__(self, *args, nan_scores=(), nan_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_scores, self.nan_steps = set(nan_scores), set(nan_steps)

    def score(self, *args):
        out = super().score(*args)
        if self.iteration + 1 in self.nan_scores:
            out["scores"] = out["scores"] * np.nan
        return out

    def train_step(self, micro_batches, **kwargs):
        if self.iteration + 1 in self.nan_steps:
            return {"actor_loss": 1.0, "critic_loss": 1.0, "tokens": 1.0,
                    "actor_grad_norm": float("nan"), "critic_grad_norm": 1.0}
        return super().train_step(micro_batches, **kwargs)


def test_a_non_finite_rollout_trains_nothing(tmp_path):
    config = _config(tmp_path, conventions={"kl_controller": "adaptive"}, max_iterations=3)
    loop = NaNPPO(config, tmp_path / "run", nan_scores={2})
    loop.train_iteration()
    w, kl = loop.w, loop.kl_state
    metrics = loop.train_iteration()
    assert loop.w == w and loop.kl_state == kl  # no step, no KL-controller update
    assert metrics["skipped_steps"] == 4  # the iteration's four optimiser steps
    metrics = loop.train_iteration()
    assert loop.w != w and metrics["skipped_steps"] == 4


def test_non_finite_gradient_norms_stop_the_run_naming_the_checkpoint(tmp_path):
    from shared.guard import NonFiniteError

    config = _config(tmp_path, max_iterations=3, guard={"max_consecutive_skips": 2})
    loop = NaNPPO(config, tmp_path / "run", nan_steps={2})
    with pytest.raises(NonFiniteError, match=r"ppo iteration 2: actor_grad_norm not finite, 2 "
                       r"skips in a row.*iter-00000001"):
        loop.run()
    assert not (tmp_path / "run" / "ppo" / "final.json").exists()


def test_iterations_of_only_too_short_answers_stop_the_run(tmp_path):
    from shared.errors import RunError

    config = _config(tmp_path, min_answer_tokens=5, guard={"max_consecutive_skips": 2})
    loop = NumpyPPO(config, tmp_path / "run", lengths=np.array([1, 2, 3, 4]))
    loop.train_iteration()  # warned: nothing to train on
    with pytest.raises(RunError, match=r"iteration 2: every answer is shorter than "
                       r"ppo.min_answer_tokens=5 \(2 iterations in a row\)"):
        loop.train_iteration()
