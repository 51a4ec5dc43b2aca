"""A direct torch transcription of DeepSpeed-Chat's PPO and reward-model math, kept
with its per-row loops and in-place writes, as the reference for the
`deepspeed_chat` preset.

Source: microsoft/DeepSpeedExamples, applications/DeepSpeed-Chat,
dschat/rlhf/ppo_trainer.py (DeepSpeedPPOTrainer: compute_rewards, train_rlhf,
get_advantages_and_returns, actor_loss_fn, critic_loss_fn) and
dschat/utils/model/reward_model.py (RewardModel.forward). The trainer's `self.*`
constants became keyword arguments with DeepSpeed-Chat's values as defaults.

Arrays are full-sequence, as there: `log_probs`, `values`, `action_mask` are [B, L - 1]
(position i predicts token i + 1) and the response starts at `start = prompt_len - 1`.
"""

import torch
import torch.nn.functional as F


def compute_rewards(
    prompts, log_probs, ref_log_probs, reward_score, action_mask, kl_ctl=0.1, clip_reward_value=5
):
    kl_divergence_estimate = -kl_ctl * (log_probs - ref_log_probs)
    rewards = kl_divergence_estimate
    start = prompts.shape[1] - 1
    ends = start + action_mask[:, start:].sum(1) + 1
    reward_clip = torch.clamp(reward_score, -clip_reward_value, clip_reward_value)
    for j in range(log_probs.shape[0]):
        rewards[j, start : ends[j]][-1] += reward_clip[j]
    return rewards


def get_advantages_and_returns(values, rewards, start, gamma=1.0, lam=0.95):
    lastgaelam = 0
    advantages_reversed = []
    length = rewards.size()[-1]
    for t in reversed(range(start, length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values[:, start:]
    return advantages.detach(), returns


def actor_loss_fn(logprobs, old_logprobs, advantages, mask, cliprange=0.2):
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / mask.sum()


def critic_loss_fn(values, old_values, returns, mask, cliprange_value=0.2):
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    return 0.5 * torch.sum(torch.max(vf_loss1, vf_loss2) * mask) / mask.sum()


def train_rlhf_math(
    prompts, log_probs, ref_log_probs, reward_score, values, attention_mask,
    actor_log_prob, new_values,
):
    """The math of DeepSpeedPPOTrainer.train_rlhf, without the models.

    `actor_log_prob` and `new_values` stand for the new forward pass ([B, L - 1]).
    Returns (old_rewards, advantages, returns, actor_loss, critic_loss).
    """
    start = prompts.size()[-1] - 1
    action_mask = attention_mask[:, 1:]
    old_values = values
    with torch.no_grad():
        old_rewards = compute_rewards(prompts, log_probs, ref_log_probs, reward_score, action_mask)
        ends = start + action_mask[:, start:].sum(1) + 1
        for i in range(old_rewards.shape[0]):
            old_rewards[i, ends[i] :] = 0
            old_values[i, ends[i] :] = 0
        advantages, returns = get_advantages_and_returns(old_values, old_rewards, start)
    actor_loss = actor_loss_fn(
        actor_log_prob[:, start:], log_probs[:, start:], advantages, action_mask[:, start:]
    )
    critic_loss = critic_loss_fn(
        new_values[:, start:], old_values[:, start:], returns, action_mask[:, start:]
    )
    return old_rewards, advantages, returns, actor_loss, critic_loss


def reward_model_loss(input_ids, rewards, pad_id, num_padding_at_beginning=0):
    """RewardModel.forward after the v_head: chosen rows first, then rejected rows."""
    chosen_mean_scores = []
    rejected_mean_scores = []
    bs = input_ids.shape[0] // 2
    seq_len = input_ids.shape[1]
    chosen_ids, rejected_ids = input_ids[:bs], input_ids[bs:]
    chosen_rewards, rejected_rewards = rewards[:bs], rewards[bs:]
    loss = 0.0
    for i in range(bs):
        chosen_id, rejected_id = chosen_ids[i], rejected_ids[i]
        chosen_reward, rejected_reward = chosen_rewards[i], rejected_rewards[i]
        c_inds = (chosen_id == pad_id).nonzero()
        c_ind = (
            c_inds[num_padding_at_beginning].item()
            if len(c_inds) > num_padding_at_beginning
            else seq_len
        )
        check_divergence = (chosen_id != rejected_id).nonzero()
        if len(check_divergence) == 0:
            end_ind = rejected_reward.size(-1)
            divergence_ind = end_ind - 1
            r_ind = c_ind
        else:
            r_inds = (rejected_id == pad_id).nonzero()
            r_ind = (
                r_inds[num_padding_at_beginning].item()
                if len(r_inds) > num_padding_at_beginning
                else seq_len
            )
            end_ind = max(c_ind, r_ind)
            divergence_ind = check_divergence[0]
        assert divergence_ind > 0
        c_truncated_reward = chosen_reward[divergence_ind:end_ind]
        r_truncated_reward = rejected_reward[divergence_ind:end_ind]
        chosen_mean_scores.append(chosen_reward[c_ind - 1])
        rejected_mean_scores.append(rejected_reward[r_ind - 1])
        loss += -F.logsigmoid(c_truncated_reward - r_truncated_reward).mean()
    loss = loss / bs
    return loss, torch.stack(chosen_mean_scores), torch.stack(rejected_mean_scores)
