"""The torch_rlhf package: cheap to import, every re-exported name resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import EOS, PAD, left_padded_prompts

import torch_rlhf
from torch_rlhf.generation import generate
from torch_rlhf.models import build_causal_lm

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_loads_no_heavy_module():
    script = ("import sys, torch_rlhf\n"
              "heavy = {'torch', 'transformers', 'deepspeed', 'peft'} & set(sys.modules)\n"
              "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_export_resolves():
    for name in torch_rlhf.__all__:
        assert getattr(torch_rlhf, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        torch_rlhf.nope  # noqa: B018


def test_bf16_model_generates_with_float32_logprobs(model_dirs):
    model = build_causal_lm(model_dirs("llama_gqa_untied"), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask = left_padded_prompts()
    out = generate(model, ids, mask, max_new_tokens=3, eos_token_id=EOS, pad_token_id=PAD)
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.logprobs).all()
