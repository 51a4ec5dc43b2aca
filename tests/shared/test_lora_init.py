"""shared.lora_init: the adapter init both backends draw from."""

from __future__ import annotations

import numpy as np

from shared.lora_init import lora_a_init


def test_keyed_deterministic_and_bounded():
    a = lora_a_init(7, "causal_lm", "model.layers.0.self_attn.q_proj", 4, 64)
    assert a.shape == (4, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, lora_a_init(7, "causal_lm",
                                                 "model.layers.0.self_attn.q_proj", 4, 64))
    assert np.abs(a).max() <= 1 / np.sqrt(64)
    for other in [(8, "causal_lm", "model.layers.0.self_attn.q_proj"),
                  (7, "value", "model.layers.0.self_attn.q_proj"),
                  (7, "causal_lm", "model.layers.0.self_attn.v_proj")]:
        assert not np.array_equal(a, lora_a_init(*other, 4, 64))
