"""Resumable checkpoints and their export to Hugging Face directories.

A checkpoint is a directory ``<run>/<step>/checkpoints/<tag>/``::

    <engine>/                 DeepSpeed ``engine.save_checkpoint`` (weights, optimizer,
                              LR scheduler, ZeRO shards) for each trained engine
                              (``model`` for SFT / reward, ``actor`` and ``critic`` for PPO)
    model_spec.json           per engine: HF config, kind (causal_lm | value), LoRA settings
    tokenizer/                the tokenizer, so ``rlhf export`` needs nothing else
    trainer_state.pt          counters, data-iterator states, KL controller, EMA, ... (rank 0)
    rng_rank<r>.pt            python / numpy / torch RNG states of each rank
    COMPLETE                  written last: a checkpoint without it is ignored
                              (``shared.checkpoints``)

It holds everything an uninterrupted run still has in memory, so a resumed run computes
bit-for-bit the same losses (docs/architecture.md, Resume).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.checkpoints import COMPLETE, CheckpointDir
from torch_rlhf.distributed import barrier, is_main, rank
from torch_rlhf.models import ValueModel, unwrap_model

__all__ = [
    "CheckpointManager",
    "capture_rng",
    "export_checkpoint",
    "restore_rng",
]

def capture_rng() -> dict[str, Any]:
    """Every RNG state a trainer's numbers can depend on."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global RNG)
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_spec(engine, lora: Mapping[str, Any] | None) -> dict[str, Any]:
    module = unwrap_model(engine)
    kind = "value" if isinstance(module, ValueModel) else "causal_lm"
    return {"kind": kind, "config": module.config.to_dict(), "lora": dict(lora) if lora else None}


class CheckpointManager:
    """Writes, finds, loads and prunes the checkpoints of one step of a run.

    The directories, their ``COMPLETE`` marker and pruning follow ``shared.checkpoints``.

    Args:
      root: ``<run>/<step>/checkpoints``.
      keep: how many complete checkpoints to keep (``logging.keep_checkpoints``).
    """

    def __init__(self, root: str | Path, *, keep: int):
        self.directory = CheckpointDir(root, keep=keep, is_main=is_main(), barrier=barrier)
        self.root = self.directory.root
        self.keep = keep

    def save(self, tag: str, engines: Mapping[str, Any], state: Mapping[str, Any], *,
             tokenizer=None, lora: Mapping[str, Mapping[str, Any] | None] | None = None) -> Path:
        """Save and complete a checkpoint named ``tag``; every rank must call this."""
        path = self.directory.prepare(tag)
        self.write(path, engines, state, tokenizer=tokenizer, lora=lora)
        self.directory.commit(path)
        return path

    def write(self, path: str | Path, engines: Mapping[str, Any], state: Mapping[str, Any], *,
              tokenizer=None, lora: Mapping[str, Mapping[str, Any] | None] | None = None) -> None:
        """Write a checkpoint into the new directory ``path`` (not yet marked complete);
        every rank must call this.

        Args:
          engines: name -> DeepSpeed training engine.
          state: the trainer state (torch-saveable), written by rank 0.
          tokenizer: saved beside, for export.
          lora: name -> LoRA settings of that engine's model (None: no LoRA).
        """
        path = Path(path)
        if is_main():
            path.mkdir(parents=True, exist_ok=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(path), tag=name, save_latest=False)
        torch.save(capture_rng(), path / f"rng_rank{rank()}.pt")
        if is_main():
            torch.save(dict(state), path / "trainer_state.pt")
            specs = {name: _model_spec(engine, (lora or {}).get(name))
                     for name, engine in engines.items()}
            (path / "model_spec.json").write_text(json.dumps(specs, indent=2, default=str))
            if tokenizer is not None:
                tokenizer.save_pretrained(path / "tokenizer")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (tags sort by their zero-padded counter)."""
        return self.directory.complete()

    def latest(self) -> Path | None:
        return self.directory.latest()

    def load(self, path: str | Path, engines: Mapping[str, Any]) -> dict[str, Any]:
        """Restore the engines (weights, optimizer, scheduler) and this rank's RNG from
        ``path``; return the trainer state."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE})")
        for name, engine in engines.items():
            loaded, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint {name!r} in {path}")
        rng_file = path / f"rng_rank{rank()}.pt"
        if rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=False))
        return torch.load(path / "trainer_state.pt", weights_only=False)


# --------------------------------------------------------------------------- export


def _engine_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    engine_dir = path / name
    if any(engine_dir.glob("*optim_states.pt")):
        # ZeRO 1-3: consolidate the fp32 master weights from the optimizer shards (offline,
        # no torch.distributed needed).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=name)
    states = torch.load(engine_dir / "mp_rank_00_model_states.pt", weights_only=False,
                        map_location="cpu")
    return states["module"]


def _skeleton(spec: Mapping[str, Any]):
    import transformers

    from torch_rlhf.lora import apply_lora

    config = dict(spec["config"])
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    if spec["kind"] == "value":
        hf = transformers.AutoModelForSequenceClassification.from_config(hf_config)
        model = ValueModel(hf)
    else:
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    lora = spec.get("lora")
    if lora:
        apply_lora(model, dim=lora["dim"], alpha=lora["alpha"], module_name=lora["module_name"],
                   target_modules=tuple(lora["target_modules"]),
                   only_optimize=lora["only_optimize"])
    return model


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> list[Path]:
    """Consolidate a checkpoint (any ZeRO stage) into Hugging Face model directories.

    A checkpoint of one engine (SFT, reward) becomes ``out_dir`` itself; a PPO checkpoint
    becomes ``out_dir/actor`` and ``out_dir/critic``. LoRA adapters are merged. Runs in one
    process, without torch.distributed. Returns the directories written.
    """
    from transformers import AutoTokenizer

    from torch_rlhf.saving import save_hf

    path = Path(checkpoint)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE}); pass a "
                                "directory <run>/<step>/checkpoints/<tag>")
    specs = json.loads((path / "model_spec.json").read_text())
    tokenizer = (AutoTokenizer.from_pretrained(path / "tokenizer")
                 if (path / "tokenizer").is_dir() else None)
    written = []
    for name, spec in specs.items():
        model = _skeleton(spec)
        state = _engine_state_dict(path, name)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied output embeddings are stored once; anything else missing is an error.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path}/{name} does not fit its model_spec: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        target = Path(out_dir) if len(specs) == 1 else Path(out_dir) / name
        save_hf(model, tokenizer, str(target))
        written.append(target)
    return written
