"""The pure-functional math core shared by the torch and JAX backends.

Framework-free: functions take arrays of any array-API namespace (numpy, torch,
jax.numpy via array_api_compat) and never import torch or jax. The subpackages
`shared.config` and `shared.data` are imported on their own, not from here.
"""

from shared.advantages import discounted_returns as discounted_returns
from shared.advantages import gae_advantages as gae_advantages
from shared.aggregation import aggregate_loss as aggregate_loss
from shared.aggregation import loss_normalizer as loss_normalizer
from shared.control import Ema as Ema
from shared.control import EmaState as EmaState
from shared.control import KLController as KLController
from shared.control import KLControllerState as KLControllerState
from shared.control import adaptive_kl_controller as adaptive_kl_controller
from shared.control import ema as ema
from shared.control import fixed_kl_controller as fixed_kl_controller
from shared.control import tree_map as tree_map
from shared.dpo import dpo_loss as dpo_loss
from shared.dpo import sequence_logprobs as sequence_logprobs
from shared.group_advantages import grpo_advantages as grpo_advantages
from shared.group_advantages import reinforce_plus_plus_advantages as reinforce_plus_plus_advantages
from shared.group_advantages import reinforce_plus_plus_returns as reinforce_plus_plus_returns
from shared.group_advantages import remax_advantages as remax_advantages
from shared.group_advantages import rloo_advantages as rloo_advantages
from shared.group_advantages import whitening_moments as whitening_moments
from shared.kl import kl_penalty as kl_penalty
from shared.logprobs import entropy_from_logits as entropy_from_logits
from shared.logprobs import token_logprobs as token_logprobs
from shared.masked import masked_mean as masked_mean
from shared.masked import masked_sum as masked_sum
from shared.masked import masked_var as masked_var
from shared.masked import masked_whiten as masked_whiten
from shared.policy_variants import DAPO_CLIP_HIGHER as DAPO_CLIP_HIGHER
from shared.policy_variants import GSPO_CLIP as GSPO_CLIP
from shared.policy_variants import gspo_policy_loss as gspo_policy_loss
from shared.ppo_losses import entropy_bonus as entropy_bonus
from shared.ppo_losses import kl_loss as kl_loss
from shared.ppo_losses import policy_loss as policy_loss
from shared.ppo_losses import ppo_ptx_objective as ppo_ptx_objective
from shared.ppo_losses import value_loss as value_loss
from shared.ppo_step import compute_advantages as compute_advantages
from shared.ppo_step import critic_loss as critic_loss
from shared.ppo_step import make_kl_controller as make_kl_controller
from shared.ppo_step import ppo_losses as ppo_losses
from shared.presets import PRESETS as PRESETS
from shared.presets import PPOConventions as PPOConventions
from shared.presets import get_preset as get_preset
from shared.reward_losses import bradley_terry_loss as bradley_terry_loss
from shared.reward_losses import dschat_pairwise_loss as dschat_pairwise_loss
from shared.reward_losses import kway_ranking_loss as kway_ranking_loss
from shared.rewards import episode_mask as episode_mask
from shared.rewards import score_position as score_position
from shared.rewards import shape_rewards as shape_rewards
from shared.rollout import minibatch_schedule as minibatch_schedule
from shared.rollout import ppo_update_counts as ppo_update_counts
from shared.rollout import sampling_uniforms as sampling_uniforms
from shared.rollout import short_answer_mask as short_answer_mask
from shared.rollout_correction import mis_mask as mis_mask
from shared.rollout_correction import rollout_logprob_gap as rollout_logprob_gap
from shared.rollout_correction import tis_weights as tis_weights
from shared.sampling import filter_logits as filter_logits
from shared.sampling import sample_token as sample_token
from shared.schedules import constant_schedule as constant_schedule
from shared.schedules import cosine_schedule as cosine_schedule
from shared.schedules import linear_schedule as linear_schedule
from shared.schedules import make_schedule as make_schedule
from shared.sft_loss import sft_loss as sft_loss
from shared.sft_loss import sft_loss_mask as sft_loss_mask
