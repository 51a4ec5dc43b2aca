"""The trainers of the three steps (the pipeline that chains them is `shared.pipeline`)."""

from jax_rlhf.train.common import RunContext as RunContext
from jax_rlhf.train.ppo import PPOTrainer as PPOTrainer
from jax_rlhf.train.reward import RewardTrainer as RewardTrainer
from jax_rlhf.train.sft import SFTTrainer as SFTTrainer
from jax_rlhf.train.step import TrainState as TrainState
