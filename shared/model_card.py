"""What every exported Hugging Face directory carries besides its weights and config.

``complete_export(directory, card)`` runs after a backend wrote ``config.json``, the weights
and the tokenizer (``save_hf`` / ``export_hf``) and before ``shared.exports.verify_export``
reads it back, for every final directory of both backends (``<run>/sft/final``,
``reward/final``, ``ppo/final``, ``ppo/critic``, ``ppo/ema``):

- ``generation_config.json`` for a causal LM, from the token ids of ``config.json``, when the
  backend did not write one (transformers' ``save_pretrained`` does; the JAX backend does
  not): what ``GenerationConfig.from_model_config`` would give;
- ``README.md``, a short model card: framework and backend, the run directory and the step
  or iteration, the base model, the config's sha256, the parity status as far as known
  (never invented), and for GPT-2 how to score a left-padded batch as the backends do.

``rlhf export`` (a checkpoint to Hugging Face directories) completes its directories the
same way, with ``checkpoint_card``.

Nothing here imports torch, jax or transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["GENERATION_CONFIG", "GPT2_POSITION_NOTE", "MODEL_CARD", "ExportCard",
           "checkpoint_card", "complete_export", "describe_source", "is_causal_lm",
           "write_generation_config", "write_model_card"]

GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"

_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

GPT2_POSITION_NOTE = (
    "GPT-2 takes absolute position embeddings, and its Hugging Face forward without "
    "`position_ids` counts positions from the first column, padding included. The "
    "framework's backends count them from each row's first real token, so on a "
    "left-padded batch plain `model(input_ids, attention_mask=mask)` differs (measured: "
    "up to 6.2 in logits and 0.9 in reward score on small random models). Pass "
    "`position_ids = (mask.cumsum(-1) - 1).clamp(min=0)` with every forward, or pad on the "
    "right to score."
)
"""The note in the card of every GPT-2 export (docs/architecture.md, exports)."""


@dataclasses.dataclass(frozen=True)
class ExportCard:
    """What produced one exported directory.

    Attributes:
      backend: ``"torch"`` or ``"jax"``.
      step: the pipeline step, ``sft``, ``reward`` or ``ppo``.
      role: which model of the step: ``final`` (the trained model), ``critic`` or ``ema``.
      run_dir: the run directory.
      progress: where in the step, e.g. ``"step 3 of 3"`` or ``"iteration 2 of 2"``.
      base_model: the directory or hub name it started from, or how it was built fresh.
      config_sha256: sha256 of the run's resolved config (``shared.manifest``).
      parity: the backend-parity status as far as known; ``"not measured"`` by default.
    """

    backend: str
    step: str
    role: str
    run_dir: str
    progress: str
    base_model: str
    config_sha256: str
    parity: str = "not measured"


def describe_source(path: str | None, fresh: Mapping[str, Any] | None, key: str) -> str:
    """The card's ``base_model`` line: the directory or hub name ``path``, else a fresh model
    built from the config key ``key`` (``fresh`` its HF config kwargs)."""
    if path is not None:
        return f"`{path}`"
    model_type = (fresh or {}).get("model_type", "unknown")
    return f"none: a fresh {model_type} model from `{key}` (random initialisation)"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_causal_lm(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` (as a dict) is a causal LM's (``*ForCausalLM``, GPT-2's
    ``GPT2LMHeadModel``) rather than a ``*ForSequenceClassification`` reward model or critic."""
    architectures = [str(a) for a in config.get("architectures") or ()]
    return bool(architectures) and not any("SequenceClassification" in a
                                           for a in architectures)


def write_generation_config(directory: str | os.PathLike) -> Path | None:
    """Write ``generation_config.json`` of a causal-LM directory that lacks one; its path
    (None for a sequence-classification model, or when one is there already)."""
    directory = Path(directory)
    config, path = _read_config(directory), directory / GENERATION_CONFIG
    if path.exists() or not is_causal_lm(config):
        return None
    data = {k: config[k] for k in _GENERATION_KEYS if config.get(k) is not None}
    data["transformers_version"] = _version("transformers")
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def _library_line(backend: str) -> str:
    names = {"torch": ("torch", "deepspeed"), "jax": ("jax", "flax")}.get(backend, ())
    return ", ".join(f"{n} {_version(n)}" for n in (*names, "transformers"))


def write_model_card(directory: str | os.PathLike, card: ExportCard) -> Path:
    """Write ``README.md``, the model card of the exported ``directory``; its path."""
    directory = Path(directory)
    config = _read_config(directory)
    model_type = config.get("model_type", "unknown")
    kind = ("AutoModelForCausalLM" if is_causal_lm(config)
            else "AutoModelForSequenceClassification")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [rlhf, rlhf-parity]",
        "---",
        "",
        f"# {card.step}/{card.role} ({model_type})",
        "",
        f"Exported by rlhf-parity, backend `{card.backend}` ({_library_line(card.backend)}).",
        f"Loads with `AutoTokenizer` and `{kind}`.",
        "",
        f"- step: `{card.step}`, model: `{card.role}`, at {card.progress}",
        f"- run directory: `{card.run_dir}`",
        f"- base model: {card.base_model}",
        f"- config sha256: `{card.config_sha256}`",
        f"- parity between the backends: {card.parity}",
    ]
    if card.parity == "not measured":
        lines.append(f"  (`rlhf parity --config {Path(card.run_dir) / 'config.yaml'} --model "
                     "<this directory>` measures it)")
    if model_type == "gpt2":
        lines += ["", "## Left padding", "", GPT2_POSITION_NOTE]
    path = directory / MODEL_CARD
    path.write_text("\n".join(lines) + "\n")
    return path


def checkpoint_card(checkpoint: str | os.PathLike, *, backend: str, role: str,
                    progress: str | None = None) -> ExportCard:
    """The card of a directory ``rlhf export`` writes from ``checkpoint``
    (``<run>/<step>/checkpoints[/<tag>]``): run, step and config hash from the path and the
    checkpoint's ``MANIFEST.json`` (``shared.manifest``) where there is one."""
    path = Path(checkpoint).resolve()
    manifest = path / "MANIFEST.json"
    sha256 = (json.loads(manifest.read_text()).get("config_sha256", "not recorded")
              if manifest.is_file() else "not recorded (a checkpoint without MANIFEST.json)")
    checkpoints = path if path.name == "checkpoints" else path.parent
    if progress is None:
        progress = f"checkpoint `{path.name}`" if path != checkpoints else "its latest checkpoint"
    return ExportCard(backend=backend, step=checkpoints.parent.name, role=role,
                      run_dir=str(checkpoints.parent.parent), progress=progress,
                      base_model="not recorded in the checkpoint (the run's config.yaml and "
                                 "summary.json name the models it started from)",
                      config_sha256=sha256)


def complete_export(directory: str | os.PathLike, card: ExportCard) -> None:
    """``write_generation_config`` and ``write_model_card`` on a directory a backend wrote."""
    write_generation_config(directory)
    write_model_card(directory, card)
