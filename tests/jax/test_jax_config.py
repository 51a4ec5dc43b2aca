"""ModelConfig <-> transformers config conversion and validation."""

import pytest
import transformers

from jax_rlhf.models import ModelConfig


def test_from_hf_to_hf_round_trip(variant, hf_configs):
    hf_config = hf_configs[variant]()
    cfg = ModelConfig.from_hf(hf_config)
    back = cfg.to_hf()
    assert back.model_type == hf_config.model_type
    assert ModelConfig.from_hf(back) == cfg
    assert ModelConfig.from_hf(hf_config.to_dict()) == cfg  # config.json dict form
    value_config = cfg.to_hf(value_head=True)
    assert value_config.num_labels == 1
    assert value_config.architectures[0].endswith("ForSequenceClassification")
    assert ModelConfig.from_hf(value_config) == cfg


def test_from_hf_reads_family_specific_fields(hf_configs):
    llama = ModelConfig.from_hf(hf_configs["llama_gqa"]())
    assert (llama.family, llama.num_heads, llama.num_kv_heads, llama.head_dim) == ("llama", 4, 2, 8)
    assert not llama.tie_word_embeddings and llama.activation == "silu"
    assert ModelConfig.from_hf(hf_configs["llama_bias"]()).rope_theta == 500.0
    qwen2 = ModelConfig.from_hf(hf_configs["qwen2"]())
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.hf_model_type) == (
        True,
        False,
        "qwen2",
    )
    opt = ModelConfig.from_hf(hf_configs["opt_350m"]())
    assert (opt.embed_dim, opt.hidden_size, opt.do_layer_norm_before) == (16, 32, False)
    assert opt.tie_word_embeddings and opt.activation == "relu"
    assert ModelConfig.from_hf(hf_configs["opt"]()).word_embed_proj_dim is None
    gpt2 = ModelConfig.from_hf(hf_configs["gpt2"]())
    assert (gpt2.intermediate_size, gpt2.activation, gpt2.norm_eps) == (128, "gelu_new", 1e-5)


def test_overrides_set_dtypes(hf_configs):
    cfg = ModelConfig.from_hf(hf_configs["gpt2"](), dtype="bfloat16", param_dtype="bfloat16")
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")


@pytest.mark.parametrize(
    "hf_config",
    [
        transformers.LlamaConfig(
            rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}
        ),
        transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True),
        transformers.OPTConfig(enable_bias=False),
        transformers.BertConfig(),
    ],
    ids=["llama_dynamic_rope", "gpt2_layer_scaling", "opt_no_bias", "bert"],
)
def test_unsupported_hf_options_raise(hf_config):
    with pytest.raises(ValueError, match="not supported|unsupported"):
        ModelConfig.from_hf(hf_config)


def test_validation_lists_allowed_values():
    fields = dict(
        vocab_size=10,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=4,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    with pytest.raises(ValueError, match=r"'bert' is not one of \(.*'gpt2'.*'llama'.*'opt'"):
        ModelConfig(family="bert", **fields)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(family="llama", **{**fields, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="grouped-query"):
        ModelConfig(family="gpt2", **{**fields, "num_kv_heads": 1})


def test_registry_finds_every_family_module_by_its_source():
    """The registry lists exactly the modules of `jax_rlhf.models` that define `FAMILY`, so
    adding a family is its own file (and its test) only."""
    import importlib
    import pkgutil

    import jax_rlhf.models as package
    from jax_rlhf.models import registry

    declaring = sorted(
        info.name for info in pkgutil.iter_modules(package.__path__)
        if hasattr(importlib.import_module(f"jax_rlhf.models.{info.name}"), "FAMILY"))
    assert registry.family_modules() == tuple(declaring)
    assert {"llama", "opt", "gpt2", "gemma", "gpt_neox", "qwen3", "phi3"} <= set(
        registry.families())
