"""DeepSpeed-Chat's step 3 (PPO) end to end, transcribed as plain torch functions over given
modules and already-sampled answer tokens: the reference the `deepspeed_chat` preset's loop is
tested against on real models.

Source: microsoft/DeepSpeedExamples, applications/DeepSpeed-Chat:
- dschat/rlhf/ppo_trainer.py, `DeepSpeedPPOTrainer`: `_generate_sequence`,
  `generate_experience`, `compute_rewards`, `train_rlhf`, `actor_loss_fn`, `critic_loss_fn`,
  `get_advantages_and_returns`, and the module function `gather_log_probs`;
- dschat/utils/model/reward_model.py, `RewardModel.forward_value` (the critic's per-token values
  and the reward model's end score);
- training/step3_rlhf_finetuning/main.py, the training loop: `MiniDataset(generation_batches,
  per_device_training_batch_size)` splits the rollout into micro-batches in order, one
  `train_rlhf` call per micro-batch, `random.shuffle(exp_dataset)` after every PPO epoch;
- dschat/utils/data/data_utils.py, `MiniDataset.seperate` and `DataCollatorRLHF` (prompts are
  left-padded with the pad token);
- DeepSpeed's `DeepSpeedEngine.backward` divides the loss by gradient_accumulation_steps
  (`scale_wrt_gas`) and `engine.step()` only updates at the accumulation boundary (every
  gradient_accumulation_steps-th micro-step, counted over the whole run); DS-Chat's
  `get_train_ds_config` sets `gradient_clipping: 1.0` for that update.

The pure math (compute_rewards, get_advantages_and_returns, actor_loss_fn, critic_loss_fn) is
the transcription in tests/shared/dschat_reference.py; this file adds the model-driven flow.

What cannot be reused from DS-Chat is its sampling: `answers` are given ([B, A] tokens sampled
up to max_answer_seq_len, `pad_id` after a row's EOS, as Hugging Face `generate` and this
project's samplers emit them) and `generated_width` / `trim_answers` reproduce how DS-Chat's
`generate(max_length=P + max_answer_seq_len)` stops once every row has finished.

Conventions of DS-Chat that this flow has and the project's default does not (see
docs/conventions.md, "DeepSpeed-Chat end to end"):
- the log-probs, ref log-probs and values entering `compute_rewards` are the full unmasked rows;
- `attention_mask = seq != pad` for the whole sequence (prompt and answer), in every forward:
  with pad == EOS the EOS (and OPT's BOS `</s>`) is masked, and the score slot is the EOS;
- the answer width is the longest answer of the generation batch;
- the losses are means per micro-batch, the gradient their sum / gradient_accumulation_steps;
- micro-batches are visited in order in the first PPO epoch.

The models are called as DS-Chat calls them, without `position_ids`, so with Hugging Face's
default positions (OPT: cumsum(mask) * mask - 1, i.e. -1 at every masked token; Llama: arange).
This project's `position_ids_from_mask` gives the same outputs at every unmasked token (OPT
exactly, rotary models up to rounding) and different ones at masked tokens, which DS-Chat's
numbers never read: slot t of the response-aligned arrays is the output at the token before
answer token t, and every slot up to the score slot is an unmasked token.

Arrays are full-sequence, as in DS-Chat: `seq` is [B, L] = [prompt P | answer W], per-position
arrays are [B, L - 1] (position i predicts token i + 1), the answer starts at
`start = P - 1`. `response(x, prompt_length)` gives the response-aligned [B, W] view.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))
from dschat_reference import (  # noqa: E402  (tests/shared is not a package)
    actor_loss_fn,
    compute_rewards,
    critic_loss_fn,
    get_advantages_and_returns,
)

ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids [B, L], attention_mask [B, L]) -> per-token values [B, L], as
`RewardModel.forward_value(..., return_value_only=True)`."""


# --------------------------------------------------------------------------- rollout shape


def generated_width(answers: torch.Tensor, eos_id: int) -> int:
    """Width of the answer part Hugging Face `generate` returns for these samples.

    DS-Chat's `_generate_sequence` calls `generate(prompts, max_length=P + max_answer_seq_len,
    pad_token_id=pad)`; generation stops after the step at which every row has emitted its EOS,
    so the answers are as wide as the longest one *including its EOS* (max_answer_seq_len when a
    row never finished). With pad == EOS the last column then holds only EOS/pad tokens: it is
    kept (it is the step that finished the last row), unlike a trailing all-pad column of a
    pad != EOS batch, which generate never produces.

    Args:
      answers: [B, A] sampled tokens, A = max_answer_seq_len, pad after a row's EOS.
      eos_id: the EOS id generate stops on (the model's generation_config.eos_token_id).
    """
    a = answers.shape[1]
    is_eos = answers == eos_id
    pos = torch.arange(a, device=answers.device).expand_as(answers)
    first_eos = torch.where(is_eos, pos, torch.full_like(pos, a)).min(dim=1).values
    return int(torch.clamp(first_eos + 1, max=a).max())


def trim_answers(answers: torch.Tensor, eos_id: int) -> torch.Tensor:
    """`answers[:, :generated_width(answers, eos_id)]`: what DS-Chat's generate returns."""
    return answers[:, : generated_width(answers, eos_id)]


def kept_rows(answers: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B] bool: the rows `_generate_sequence` keeps, `(ans != pad).sum(-1) > 1`.

    ("Dropping too short generated answer"): an answer of at most one non-pad token is dropped
    from the experience. With pad == EOS, `x EOS` (one real token) is dropped; with pad != EOS
    it counts two tokens and is kept.
    """
    return (answers != pad_id).sum(dim=-1) > 1


# --------------------------------------------------------------------------- models


def gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ppo_trainer.py `gather_log_probs`: log_softmax(logits)[labels], [B, L - 1]."""
    log_probs = F.log_softmax(logits, dim=-1)
    log_probs_labels = log_probs.gather(dim=-1, index=labels.unsqueeze(-1))
    return log_probs_labels.squeeze(-1)


def end_scores(values: torch.Tensor, input_ids: torch.Tensor, *, pad_id: int,
               prompt_length: int) -> torch.Tensor:
    """`RewardModel.forward_value`'s `chosen_end_scores`, [B].

    Per row: c_ind = prompt_length + index of the first pad in input_ids[prompt_length:]
    (seq_len when there is none), score = values[c_ind - 1]. With pad == EOS the first pad
    is the EOS itself, so the score is read at the last token *before* the EOS; with
    pad != EOS it is read at the EOS. `num_padding_at_beginning` plays no part here: it only
    enters `RewardModel.forward` (step 2's pairwise loss), and forward_value searches the
    answer part only ("we do not need to care about the padding at the beginning").
    """
    assert prompt_length > 1, "prompt_length must be greater than 1 to help select the end score"
    bs = values.size(0)
    seq_len = input_ids.shape[1]
    chosen_end_scores = []
    for i in range(bs):
        input_id = input_ids[i]
        value = values[i]
        c_inds = (input_id[prompt_length:] == pad_id).nonzero()
        c_ind = c_inds[0].item() + prompt_length if len(c_inds) > 0 else seq_len
        chosen_end_scores.append(value[c_ind - 1])
    return torch.stack(chosen_end_scores)


class RewardModel(torch.nn.Module):
    """reward_model.py `RewardModel` (the critic and the reward model of step 3): a base
    `AutoModel` and a bias-free `v_head` on its last hidden state (`word_embed_proj_dim` wide
    for OPT, after project_out)."""

    def __init__(self, base_model: torch.nn.Module, pad_id: int):
        super().__init__()
        config = base_model.config
        width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.v_head = torch.nn.Linear(width, 1, bias=False)
        self.rwtransformer = base_model
        self.PAD_ID = pad_id

    def forward_value(self, input_ids, attention_mask=None, return_value_only=False,
                      prompt_length=0, use_cache=False):
        hidden_states = self.rwtransformer(
            input_ids, attention_mask=attention_mask, use_cache=use_cache)[0]
        values = self.v_head(hidden_states).squeeze(-1)
        if return_value_only:
            return values
        return {"values": values,
                "chosen_end_scores": end_scores(values, input_ids, pad_id=self.PAD_ID,
                                                prompt_length=prompt_length)}

    def __call__(self, input_ids, attention_mask):  # the ValueFn interface
        return self.forward_value(input_ids, attention_mask, return_value_only=True)


def value_fn(value_model: torch.nn.Module) -> ValueFn:
    """A ValueFn over this project's `torch_rlhf.models.ValueModel` (a sequence-classification
    model whose `score` head is read at every token) called as DS-Chat's `forward_value` calls
    its backbone: `base(input_ids, attention_mask=...)`, no position ids (ValueModel.forward
    passes `position_ids_from_mask`, which differs from Hugging Face's default positions only
    at masked tokens: see the module docstring)."""
    hf = value_model.model

    def values(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hf.base_model(input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state
        return hf.score(hidden).squeeze(-1)

    return values


# --------------------------------------------------------------------------- experience


def generate_experience(actor: torch.nn.Module, ref: torch.nn.Module, critic: ValueFn,
                        reward: ValueFn, prompts: torch.Tensor, answers: torch.Tensor, *,
                        pad_id: int, compute_fp32_loss: bool = False) -> dict[str, torch.Tensor]:
    """`DeepSpeedPPOTrainer.generate_experience` after `_generate_sequence`.

    `answers` must already be what generate returned (see `trim_answers`) with the short rows
    dropped (see `kept_rows`); `prompts` are the matching rows. The caller puts the modules in
    the mode DS-Chat has them in (it calls `self.train()` before these forwards, so dropout
    must be disabled for a deterministic comparison).

    Args:
      actor, ref: Hugging Face causal LMs, called as `model(seq, attention_mask=mask)`.
      critic, reward: ValueFn (per-token values [B, L]).
      prompts: [B, P] left-padded prompt ids.
      answers: [B, W] answer ids.
      pad_id: the tokenizer's pad id.

    Returns:
      DS-Chat's experience dict: prompts [B, P], logprobs / ref_logprobs / value [B, L - 1]
      (unmasked), rewards [B] (the reward model's end scores), input_ids [B, L],
      attention_mask [B, L] (= seq != pad).
    """
    seq = torch.cat([prompts, answers], dim=1)
    prompt_length = prompts.shape[1]
    attention_mask = seq.not_equal(pad_id).long()
    with torch.no_grad():
        output = actor(seq, attention_mask=attention_mask)
        output_ref = ref(seq, attention_mask=attention_mask)
        reward_score = end_scores(reward(seq, attention_mask), seq, pad_id=pad_id,
                                  prompt_length=prompt_length).detach()
        values = critic(seq, attention_mask).detach()[:, :-1]
    logits = output.logits
    logits_ref = output_ref.logits
    if compute_fp32_loss:
        logits = logits.to(torch.float)
        logits_ref = logits_ref.to(torch.float)
    return {
        "prompts": prompts,
        "logprobs": gather_log_probs(logits[:, :-1, :], seq[:, 1:]),
        "ref_logprobs": gather_log_probs(logits_ref[:, :-1, :], seq[:, 1:]),
        "value": values,
        "rewards": reward_score,
        "input_ids": seq,
        "attention_mask": attention_mask,
    }


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Hyper:
    """`DeepSpeedPPOTrainer.__init__`'s constants (DS-Chat's values as defaults) and the
    DeepSpeed engines' gradient_accumulation_steps (the actor's doubles with ptx, which this
    flow does not train)."""

    kl_ctl: float = 0.1
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    gradient_accumulation_steps: int = 1


def train_rlhf(actor: torch.nn.Module, critic: ValueFn, inputs: dict[str, torch.Tensor],
               hyper: Hyper = Hyper()) -> dict[str, torch.Tensor]:
    """`DeepSpeedPPOTrainer.train_rlhf` for one micro-batch, up to the engines' `step()`.

    `actor_model.backward(actor_loss)` and `critic_model.backward(critic_loss)` become
    `(loss / gradient_accumulation_steps).backward()` (DeepSpeedEngine.backward's GAS scaling),
    so `.grad` accumulates as DeepSpeed's does. `inputs['value']` is zeroed after each row's
    end in place, as DS-Chat's `old_values = values` does.

    Returns:
      rewards [B, L - 1] (old_rewards, zero after each row's end), advantages and returns
      [B, W] (response-aligned), actor_loss and critic_loss (scalars, not divided by gas),
      ends [B] (start + answer tokens + 1: the score slot is ends - 1, capped at L - 2).
    """
    prompts = inputs["prompts"]
    log_probs = inputs["logprobs"]
    ref_log_probs = inputs["ref_logprobs"]
    reward_score = inputs["rewards"]
    values = inputs["value"]
    attention_mask = inputs["attention_mask"]
    seq = inputs["input_ids"]

    start = prompts.size()[-1] - 1
    action_mask = attention_mask[:, 1:]

    old_values = values
    with torch.no_grad():
        old_rewards = compute_rewards(prompts, log_probs, ref_log_probs, reward_score,
                                      action_mask, kl_ctl=hyper.kl_ctl,
                                      clip_reward_value=hyper.clip_reward_value)
        ends = start + action_mask[:, start:].sum(1) + 1
        # we need to zero out the reward and value after the end of the conversation
        # otherwise the advantage/return will be wrong
        for i in range(old_rewards.shape[0]):
            old_rewards[i, ends[i]:] = 0
            old_values[i, ends[i]:] = 0
        advantages, returns = get_advantages_and_returns(old_values, old_rewards, start,
                                                         gamma=hyper.gamma, lam=hyper.lam)

    gas = hyper.gradient_accumulation_steps
    batch = {"input_ids": seq, "attention_mask": attention_mask}
    actor_prob = actor(**batch, use_cache=False).logits
    actor_log_prob = gather_log_probs(actor_prob[:, :-1, :], seq[:, 1:])
    actor_loss = actor_loss_fn(actor_log_prob[:, start:], log_probs[:, start:], advantages,
                               action_mask[:, start:], cliprange=hyper.cliprange)
    (actor_loss / gas).backward()  # self.actor_model.backward(actor_loss)

    value = critic(seq, attention_mask)[:, :-1]
    critic_loss = critic_loss_fn(value[:, start:], old_values[:, start:], returns,
                                 action_mask[:, start:], cliprange_value=hyper.cliprange_value)
    (critic_loss / gas).backward()  # self.critic_model.backward(critic_loss)
    return {"rewards": old_rewards, "advantages": advantages, "returns": returns,
            "actor_loss": actor_loss.detach(), "critic_loss": critic_loss.detach(),
            "ends": ends}


def separate(experiences: Sequence[dict[str, torch.Tensor]],
             micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """data_utils.py `MiniDataset.seperate`: every generation batch cut into micro-batches of
    `micro_batch_size` rows, in order (the last one of a batch may be smaller)."""
    small = []
    for large in experiences:
        size = len(large[next(iter(large))])
        for i in range(0, size, micro_batch_size):
            small.append({k: v[i:i + micro_batch_size] for k, v in large.items()})
    return small


def response(x: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The response-aligned [B, W] slice `x[:, P - 1:]` of a [B, L - 1] per-position array."""
    return x[:, prompt_length - 1:]


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
            for n, p in module.named_parameters() if p.requires_grad}


@dataclass
class Step3Result:
    """What one call of `step3` produced.

    experiences: DS-Chat's experience dicts, one per generation batch (after trimming and
      dropping; `value` zeroed after each row's end by train_rlhf, as in DS-Chat).
    kept: per generation batch, the [B] bool rows `_generate_sequence` kept.
    micro_batches: one dict per train_rlhf call, in the order of the calls: the micro-batch's
      `inputs` plus train_rlhf's outputs (rewards, advantages, returns, actor_loss,
      critic_loss, ends) and `epoch`.
    step_grads: at every DeepSpeed accumulation boundary reached, the (actor, critic)
      gradients {name: tensor} the engines' step would use (before clipping).
    actor_grads, critic_grads: the `.grad` of every trainable parameter when the call returns
      (the accumulation since the last boundary; the last boundary's grads when the call ended
      on one and no optimizer_step was given).
    """

    experiences: list[dict[str, torch.Tensor]]
    kept: list[torch.Tensor]
    micro_batches: list[dict] = field(default_factory=list)
    step_grads: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = field(
        default_factory=list)
    actor_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    critic_grads: dict[str, torch.Tensor] = field(default_factory=dict)


def step3(
    actor: torch.nn.Module,
    ref: torch.nn.Module,
    critic_model: torch.nn.Module,
    reward: ValueFn,
    prompts: torch.Tensor | Sequence[torch.Tensor],
    answers: torch.Tensor | Sequence[torch.Tensor],
    *,
    pad_id: int,
    eos_id: int,
    micro_batch_size: int,
    hyper: Hyper = Hyper(),
    critic: ValueFn | None = None,
    ppo_epochs: int = 1,
    shuffle: Callable[[list], None] | None = None,
    micro_step: int = 0,
    optimizer_step: Callable[[], None] | None = None,
    trim: bool = True,
    drop_short: bool = True,
) -> Step3Result:
    """One rollout of DS-Chat's step-3 loop (main.py): experience of every generation batch,
    then `ppo_epochs` passes of one `train_rlhf` per micro-batch.

    Args:
      actor, ref: Hugging Face causal LMs (caller zeroes the actor's `.grad` beforehand).
      critic_model: the critic module whose parameters' gradients are returned.
      reward: ValueFn of the reward model.
      prompts: [B, P] left-padded prompt ids, or a list of them (generation_batches > 1).
      answers: [B, A] sampled answers (pad after a row's EOS), or a list matching `prompts`.
      pad_id, eos_id: the tokenizer's pad id; the EOS id generation stops on.
      micro_batch_size: per_device_training_batch_size.
      hyper: the trainer's constants and gradient_accumulation_steps.
      critic: ValueFn of the critic (default: `critic_model` itself is called).
      ppo_epochs: passes over the micro-batches; after each, `shuffle(micro_batches)` runs
        (DS-Chat's `random.shuffle(exp_dataset)`; required when ppo_epochs > 1).
      micro_step: DeepSpeed micro-steps already accumulated towards the next boundary (the
        engines count over the whole run: with one micro-batch per rollout and gas = 2, a
        boundary falls every second rollout).
      optimizer_step: called at every accumulation boundary after its gradients are recorded;
        it must clip (DS-Chat: gradient_clipping 1.0), update both models and zero their
        grads. Without it, a boundary before the last micro-batch raises (DS-Chat would
        have updated the models there).
      trim: cut each generation batch's answers to generate's width (`trim_answers`).
      drop_short: drop the rows `_generate_sequence` drops (`kept_rows`).

    Returns:
      Step3Result.
    """
    critic = critic if critic is not None else critic_model
    if isinstance(prompts, torch.Tensor):
        prompts, answers = [prompts], [answers]
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers need one entry per generation batch")
    if ppo_epochs > 1 and shuffle is None:
        raise ValueError("ppo_epochs > 1 needs `shuffle` (DS-Chat's random.shuffle)")
    experiences, kept = [], []
    for batch_prompts, batch_answers in zip(prompts, answers, strict=True):
        if trim:
            batch_answers = trim_answers(batch_answers, eos_id)
        keep = kept_rows(batch_answers, pad_id) if drop_short else torch.ones(
            batch_answers.shape[0], dtype=torch.bool)
        if not bool(keep.any()):
            raise ValueError("every answer is too short: DS-Chat would reuse the previous "
                             "experience (last_generated_experience)")
        kept.append(keep)
        experiences.append(generate_experience(actor, ref, critic, reward, batch_prompts[keep],
                                               batch_answers[keep], pad_id=pad_id))
    result = Step3Result(experiences=experiences, kept=kept)
    exp_dataset = separate(experiences, micro_batch_size)
    gas = hyper.gradient_accumulation_steps
    total = ppo_epochs * len(exp_dataset)
    calls = 0
    for epoch in range(ppo_epochs):
        for exp_data in exp_dataset:
            out = train_rlhf(actor, critic, exp_data, hyper)
            result.micro_batches.append({"inputs": exp_data, "epoch": epoch, **out})
            calls += 1
            micro_step += 1
            if micro_step % gas == 0:  # DeepSpeedEngine.is_gradient_accumulation_boundary
                result.step_grads.append((_grads(actor), _grads(critic_model)))
                if optimizer_step is not None:
                    optimizer_step()
                elif calls < total:
                    raise ValueError(
                        f"DeepSpeed updates the models after micro-batch {calls} of {total} "
                        "(gradient_accumulation_steps boundary): pass optimizer_step")
        if shuffle is not None:
            shuffle(exp_dataset)
    result.actor_grads = _grads(actor)
    result.critic_grads = _grads(critic_model)
    return result
