"""A real torch run's checkpoints carry their manifest (DeepSpeed files hashed, torch
versions), and neither the JAX backend nor a changed config may resume it."""

from __future__ import annotations

import json

import pytest
import torch
from rlhf_configs import family_models, merge, write_config

from shared.config import load_config
from shared.manifest import MANIFEST, ResumeMismatchError
from shared.pipeline import run_step
from torch_rlhf.sft import SFTTrainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning"),
]


def test_a_torch_sft_run_is_resumed_only_by_torch_under_its_config(tmp_path, distributed,
                                                                    model_dirs, data_cache):
    overrides = merge(family_models(model_dirs("llama_gqa_untied")), {
        "data": {"cache_dir": data_cache}, "eval": {"metric": "none"},
        "logging": {"save_interval": 1}, "sft": {"max_steps": 2}})
    path, config = write_config(tmp_path, overrides)
    run_dir = tmp_path / "run"
    trainer = SFTTrainer(config, run_dir=run_dir)
    trainer.run()  # exports sft/final and reads it back
    latest = trainer.loop.checkpoints.latest()
    manifest = json.loads((latest / MANIFEST).read_text())
    assert manifest["backend"] == "torch" and manifest["versions"]["torch"] == torch.__version__
    assert "trainer_state.pt" in manifest["files"]
    assert any(name.startswith("model/") for name in manifest["files"])  # DeepSpeed's states

    (run_dir / "summary.json").unlink()  # as if killed before the step recorded itself
    with pytest.raises(ResumeMismatchError, match="written by the torch backend and this run "
                                                  "uses jax"):
        run_step("jax", config, run_dir, "sft", resume=True)

    changed = load_config(path, ["sft.max_steps=3"])
    with pytest.raises(ResumeMismatchError, match="sft.max_steps: 2 -> 3"):
        SFTTrainer(changed, run_dir=run_dir).run(resume=True)
