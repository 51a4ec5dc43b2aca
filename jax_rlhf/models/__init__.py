"""Flax NNX decoder-only models and their Hugging Face converter; `registry` lists the families."""

from jax_rlhf.models.causal_lm import CausalLM as CausalLM
from jax_rlhf.models.causal_lm import ValueHeadModel as ValueHeadModel
from jax_rlhf.models.causal_lm import build_backbone as build_backbone
from jax_rlhf.models.config import ModelConfig as ModelConfig
from jax_rlhf.models.convert import CheckpointMismatchError as CheckpointMismatchError
from jax_rlhf.models.convert import from_state_dict as from_state_dict
from jax_rlhf.models.convert import hf_parameter_names as hf_parameter_names
from jax_rlhf.models.convert import load_causal_lm as load_causal_lm
from jax_rlhf.models.convert import load_value_head_model as load_value_head_model
from jax_rlhf.models.convert import read_config as read_config
from jax_rlhf.models.convert import read_hf_state_dict as read_hf_state_dict
from jax_rlhf.models.convert import save_hf as save_hf
from jax_rlhf.models.convert import to_state_dict as to_state_dict
from jax_rlhf.models.decoder import set_remat as set_remat
from jax_rlhf.models.family import Family as Family
from jax_rlhf.models.kv_cache import KVCache as KVCache
from jax_rlhf.models.kv_cache import positions_from_mask as positions_from_mask
from jax_rlhf.models.lora import LoRALinear as LoRALinear
from jax_rlhf.models.lora import apply_lora as apply_lora
from jax_rlhf.models.lora import is_lora_param as is_lora_param
from jax_rlhf.models.lora import lora_targets as lora_targets
from jax_rlhf.models.lora import merge_lora as merge_lora
from jax_rlhf.models.registry import families as families
from jax_rlhf.models.registry import family_for_model_type as family_for_model_type
