import dataclasses

import pytest

from shared import PRESETS, PPOConventions, get_preset


def test_deepspeed_chat_preset_values():
    c = get_preset("deepspeed_chat")
    # DeepSpeedPPOTrainer.__init__: kl_ctl 0.1, clip_reward_value 5, cliprange(_value) 0.2,
    # gamma 1, lam 0.95; compute_rewards' off-by-one position and zeroing after `ends`.
    assert (c.kl_coef, c.reward_clip, c.clip_low, c.value_clip) == (0.1, 5.0, 0.2, 0.2)
    assert (c.gamma, c.lam, c.value_loss_scale) == (1.0, 0.95, 0.5)
    assert (c.reward_position, c.zero_after_end, c.gae_mask_mode) == (
        "dschat", True, "zero_after_end"
    )
    assert not c.whiten_advantages and c.loss_agg_mode == "token-mean"


def test_other_presets():
    assert get_preset("openrlhf").kl_coef == 0.01 and get_preset("openrlhf").reward_clip == 10.0
    trl = get_preset("trl")
    assert (trl.kl_coef, trl.value_loss_scale, trl.whiten_rewards) == (0.05, 0.05, False)
    nemo = get_preset("nemo")
    assert (nemo.kl_estimator, nemo.kl_coef, nemo.whiten_advantages) == ("abs", 0.01, True)
    default = get_preset("default")
    assert default.reward_position == "last_token"
    assert set(PRESETS) == {"default", "deepspeed_chat", "nemo", "openrlhf", "trl", "grpo",
                            "dr_grpo", "dapo", "rloo", "reinforce_plus_plus", "gspo"}


def test_critic_free_presets_name_their_estimator_and_kl():
    """Every preset says which advantage estimator and KL placement it uses."""
    grpo = get_preset("grpo")
    assert (grpo.advantage_estimator, grpo.kl_in, grpo.kl_estimator, grpo.kl_coef) == (
        "grpo", "loss", "k3", 0.04)
    assert not grpo.whiten_advantages and grpo.loss_agg_mode == "seq-mean-token-mean"
    assert get_preset("dr_grpo").advantage_estimator == "dr_grpo"
    dapo = get_preset("dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.kl_coef) == (0.2, 0.28, 0.0)
    assert get_preset("gspo").policy_loss == "gspo"
    assert (get_preset("rloo").advantage_estimator, get_preset("rloo").kl_in) == ("rloo",
                                                                                 "reward")
    assert get_preset("reinforce_plus_plus").kl_in == "reward"
    for name in ("default", "deepspeed_chat", "nemo", "openrlhf", "trl"):
        assert get_preset(name).advantage_estimator == "gae"
        assert get_preset(name).policy_loss == "ppo"
        assert get_preset(name).rollout_correction == "none"


def test_get_preset_errors_list_names():
    with pytest.raises(ValueError, match="deepspeed_chat"):
        get_preset("ppo2")


def test_get_preset_overrides_are_validated():
    assert get_preset("default", kl_coef=0.2).kl_coef == 0.2
    with pytest.raises(ValueError, match="kl_coef"):
        get_preset("default", kl_coef=-1.0)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("kl_estimator", "k4", "'k1', 'abs', 'k2', 'k3'"),
        ("kl_in", "both", "'reward', 'loss'"),
        ("reward_position", "eos", "'last_token', 'dschat'"),
        ("gae_mask_mode", "none", "zero_after_end"),
        ("loss_agg_mode", "sum", "token-mean"),
        ("zero_after_end", "yes", "True, False"),
        ("gamma", 1.5, "[0, 1]"),
        ("clip_low", 0.0, "(0, 1)"),
        ("dual_clip", 1.0, "> 1"),
        ("value_clip", -0.2, "None or a finite number > 0"),
        # NaN fails every comparison, an infinity passes `>= 0`: both are refused by name
        ("kl_coef", float("inf"), "a finite number >= 0"),
        ("kl_coef", float("nan"), "a finite number >= 0"),
        ("kl_target", float("inf"), "a finite number > 0"),
        ("kl_horizon", float("nan"), "a finite number > 0"),
        ("entropy_coef", float("nan"), "a finite number >= 0"),
        ("entropy_coef", float("-inf"), "a finite number >= 0"),
        ("entropy_coef", -0.01, "a finite number >= 0"),
        ("value_loss_scale", float("inf"), "a finite number > 0"),
        ("reward_clip", float("inf"), "None disables it"),
        ("log_ratio_clamp", float("nan"), "None or a finite number > 0"),
        ("dual_clip", float("inf"), "None or a finite number > 1"),
    ],
)
def test_validation_names_field_value_and_allowed(field, value, fragment):
    with pytest.raises(ValueError) as info:
        PPOConventions(**{field: value})
    message = str(info.value)
    assert field in message and repr(value) in message and fragment in message


def test_dschat_position_needs_zero_after_end_gae():
    with pytest.raises(ValueError, match="skip_masked"):
        PPOConventions(reward_position="dschat", gae_mask_mode="skip_masked")


def test_frozen_and_documented():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("default").kl_coef = 1.0  # type: ignore[misc]
    fields = {f.name for f in dataclasses.fields(PPOConventions)}
    assert {"kl_estimator", "kl_horizon", "loss_agg_mode", "value_loss_scale"} <= fields
