"""`ppo.preset: deepspeed_chat` reproduces DeepSpeed-Chat's step 3 end to end, on both backends.

The project's real code (`PPOTrainer` of each backend: its sampler, scoring forwards, the loop
of `shared.ppo_loop`, its optimiser step) runs one PPO iteration from two tiny OPT checkpoints;
`dschat_flow.step3` (DeepSpeed-Chat's `generate_experience` + `train_rlhf` flow, transcribed)
runs on fresh Hugging Face copies of the same checkpoints, from the prompts and the answer
tokens the backend sampled. Compared: the per-token rewards, advantages and returns, the actor
and critic losses of the optimiser step and its gradient norms. With pad != EOS (the demo
tokenizer's own pad) and pad == EOS (`data.pad_with_eos`, as DeepSpeed-Chat's OPT tokenizer):
the EOS is masked, the score slot moves one earlier. Two micro-batches of two rows make one
DeepSpeed accumulation step (`accumulation_scaling: micro_batch_mean`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from dschat_flow import Hyper, response, step3, value_fn

REPO = Path(__file__).resolve().parents[2]
EOS = 11
"""The demo tokenizer's "7" made the EOS: the tiny random SFT model below samples it often
(at temperature 1.5 and seed 1 every answer of the batch ends, after 3 to 8 tokens), so the
trimmed width and the score slots matter; the test checks that it is so."""
OPT = dict(model_type="opt", vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
           num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
           do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
           activation_dropout=0.0, layerdrop=0.0, pad_token_id=0, bos_token_id=1,
           eos_token_id=EOS)
SEQUENCES = ("pad_ne_eos", "pad_eq_eos")

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def opt_dirs(tmp_path_factory):
    from transformers import AutoTokenizer

    from parity_tests.harness import build_checkpoint

    tmp = tmp_path_factory.mktemp("dschat-e2e")
    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "configs" / "demo" / "tokenizer"))
    tokenizer.eos_token = "7"
    assert tokenizer.eos_token_id == EOS
    tokenizer.save_pretrained(tmp / "tokenizer")
    return {"sft": build_checkpoint(OPT, tmp / "sft", kind="lm", seed=3, tokenizer=tokenizer),
            "reward": build_checkpoint(OPT, tmp / "reward", kind="value", seed=4,
                                       tokenizer=tokenizer),
            "tokenizer": tmp / "tokenizer"}


def _config(tmp: Path, dirs, *, pad_with_eos: bool):
    from shared.config import load_config

    data = {
        "base": str(REPO / "configs" / "demo.yaml"),
        "output_dir": str(tmp / "runs"), "seed": 1,
        "model": {"actor_model_name_or_path": str(dirs["sft"]),
                  "critic_model_name_or_path": str(dirs["reward"]),
                  "tokenizer_name_or_path": str(dirs["tokenizer"]), "actor_config": None,
                  "critic_config": None, "dtype": "fp32"},
        "data": {"cache_dir": str(tmp / "cache"), "pad_with_eos": pad_with_eos,
                 "max_answer_seq_len": 12},
        "logging": {"progress_bar": False, "enable_tensorboard": False},
        "eval": {"metric": "none"},
        "ppo": {"preset": "deepspeed_chat", "per_device_generation_batch_size": 4,
                "per_device_training_batch_size": 2, "gradient_accumulation_steps": 2,
                "generation_batches": 1, "ppo_epochs": 1, "max_iterations": 1,
                "unsup_coef": 0.0, "enable_ema": False, "min_answer_tokens": 2,
                "short_answer_policy": "dschat",
                "sampling": {"temperature": 1.5, "top_k": 0, "top_p": 1.0}},
        "engine": {"torch": {"zero_stage": 0, "actor_zero_stage": 0, "critic_zero_stage": 0,
                             "hybrid_engine": "off"}},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)


def _trainer(backend: str, config, run_dir: Path):
    if backend == "torch":
        from parity_tests.optimiser import ensure_torch_distributed
        from torch_rlhf.ppo import PPOTrainer

        ensure_torch_distributed()
        return PPOTrainer(config, run_dir=run_dir)
    from jax_rlhf.train.ppo import PPOTrainer

    return PPOTrainer(config, run_dir=run_dir)


def _dschat_models(dirs):
    from transformers import AutoModelForCausalLM

    from torch_rlhf.models import build_value_model

    actor = AutoModelForCausalLM.from_pretrained(dirs["sft"]).float().eval()
    ref = AutoModelForCausalLM.from_pretrained(dirs["sft"]).float().eval().requires_grad_(False)
    critic = build_value_model(str(dirs["reward"])).float().eval()
    reward = build_value_model(str(dirs["reward"])).float().eval().requires_grad_(False)
    return actor, ref, critic, reward


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


@pytest.mark.parametrize("pad_with_eos", [False, True], ids=["pad_ne_eos", "pad_eq_eos"])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_deepspeed_chat_step3_end_to_end(backend, pad_with_eos, opt_dirs, tmp_path):
    config = _config(tmp_path, opt_dirs, pad_with_eos=pad_with_eos)
    trainer = _trainer(backend, config, tmp_path / "run")
    pad = trainer.pad_token_id
    assert (pad == EOS) == pad_with_eos
    experience = trainer.generate_experience(trainer.prompt_iterator.next_batch())
    # DeepSpeed-Chat drops answers of <= 1 token; with none dropped the micro-batches agree
    assert not experience.is_short.any(), experience.sample_mask.sum(1)
    # what the test is about: answers that end before the width, EOS masked when it is pad
    ended = (experience.response == EOS).any(1)
    assert ended.any() and experience.answer_width < config.data.max_answer_seq_len
    assert (experience.sample_mask[experience.response == EOS] == 0).all() == pad_with_eos
    # no pad token sampled inside an answer: there the models' position ids differ (ours
    # cumsum(mask) - 1, DeepSpeed-Chat's Hugging Face defaults), docs/conventions.md
    width = experience.response.shape[1]
    before_end = np.arange(width) < experience.sample_mask.sum(1)[:, None]
    assert (experience.sample_mask[before_end] == 1).all()
    scored = trainer.with_advantages([experience])

    actor, ref, critic, reward = _dschat_models(opt_dirs)
    prompts = torch.from_numpy(experience.prompt_ids)
    answers = torch.from_numpy(experience.response)
    result = step3(actor, ref, critic, value_fn(reward), prompts, answers, pad_id=pad,
                   eos_id=EOS, micro_batch_size=2, critic=value_fn(critic),
                   hyper=Hyper(gradient_accumulation_steps=2))
    assert bool(result.kept[0].all())
    p = prompts.shape[1]
    micro = result.micro_batches
    width = micro[0]["advantages"].shape[1]
    assert width == experience.answer_width <= config.data.max_answer_seq_len
    expected = {"token_rewards": torch.cat([response(m["rewards"], p) for m in micro]),
                "advantages": torch.cat([m["advantages"] for m in micro]),
                "returns": torch.cat([m["returns"] for m in micro])}
    for name, want in expected.items():
        got = getattr(scored, name)
        np.testing.assert_allclose(got[:, :width], want.numpy(), rtol=1e-4, atol=2e-5,
                                   err_msg=name)
        assert not got[:, width:].any(), name

    metrics = trainer.train_on_experience([experience])
    (actor_grads, critic_grads), = result.step_grads
    # the step's losses: DeepSpeed's sum over micro-batches of each micro-batch's mean / gas
    dschat_actor = sum(float(m["actor_loss"]) for m in micro) / 2
    dschat_critic = sum(float(m["critic_loss"]) for m in micro) / 2
    assert metrics["actor_loss"] == pytest.approx(dschat_actor, rel=1e-4, abs=1e-6)
    assert metrics["critic_loss"] == pytest.approx(dschat_critic, rel=1e-4, abs=1e-6)
    assert metrics["actor_grad_norm"] == pytest.approx(_norm(actor_grads), rel=1e-4)
    assert metrics["critic_grad_norm"] == pytest.approx(_norm(critic_grads), rel=1e-4)
    record = {k: metrics[k] for k in ("actor_loss", "critic_loss", "actor_grad_norm")}
    assert all(np.isfinite(v) for v in record.values()), json.dumps(record)
