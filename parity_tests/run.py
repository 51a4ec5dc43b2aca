"""`rlhf parity`: both backends on the user's model and a few rows of the user's data.

    from parity_tests.run import run_parity, main
    rows = run_parity(config)                       # the config's models (built if from scratch)
    rows = run_parity(config, model_dir="out/sft")  # a saved HF directory instead
    exit_code = main(config, args)                  # args.model: optional directory

`shared.cli` dispatches `rlhf parity --config FILE [--model DIR] [key=value ...]` to `main`
with the config after the overrides (`ppo.preset=deepspeed_chat`, `ppo.ptx_mode=separate`,
...). `main` runs every level (`command_levels`), `run_parity` levels 1-5 unless told
otherwise. The run prints a line to stderr as each level starts and finishes, then a table per
level (rows, passed, failed; `level_summary`), a table of every row (level, quantity, max abs
diff, max rel diff, tolerance, pass/fail), the pass count split into rows on the model (levels
2-5) and rows independent of it (levels 1 and 6), and `main` returns 1 when any row fails, so
`rlhf parity` can gate a CI job; a model one backend cannot build is refused first with
status 2 and one line (`check_model_support`). See docs/parity.md.

What runs (fp32 on CPU, whatever the config's dtype):
  level 1  every public `shared` function, numpy vs torch vs jitted JAX;
  level 2  forward of the actor (logits, token log-probs, entropy) and of the critic (values,
           end scores) on the SFT rows (right-padded) and the PPO prompts (left-padded);
  level 3  SFT loss, the configured reward loss, PPO actor and critic losses under the
           config's conventions (`mask_pad_tokens` applied to the answers' mask), entropy,
           ptx: losses, statistics and parameter gradients;
  level 4  3 AdamW steps of the actor with the config's `sft.optim` (schedule, decay,
           clipping) on the SFT rows, each backend's own optimiser: losses, lr, grad norms,
           parameters;
  level 5  greedy and sampled decoding with the config's sampling settings;
  level 6  (`rlhf parity`, or `run_parity(levels_to_run=(6,))`: ~30 s) whole SFT / reward /
           PPO runs through both backends' trainers on the built-in tiny Llama of
           `parity_tests.iterations` under the config's PPO choices
           (`iterations.level6_settings`: preset, conventions, short-answer policy, ptx mode,
           gradient accumulation, EMA, sampling, pad_with_eos, LoRA / only_optimize); it
           checks the trainers under your conventions, not your model.
A level or step the config cannot feed (no reward data, no JAX sampler yet) is listed as
skipped with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity_tests import batches as B
from parity_tests import levels
from parity_tests.decoding import LevelUnavailable, sampler_rows
from parity_tests.harness import (
    ModelPair,
    Row,
    build_checkpoint,
    checkpoint_kind,
    format_table,
    load_pair,
)
from shared.errors import EXIT_INPUT, InputError

__all__ = ["AVAILABLE_LEVELS", "COMMAND_LEVELS", "DEFAULT_LEVELS", "LEVEL_NAMES", "MODEL_LEVELS",
           "UnsupportedModelError", "check_model_support", "command_levels", "level_summary",
           "main", "model_dependent", "pass_counts", "run_parity"]

logger = logging.getLogger(__name__)

DEFAULT_LEVELS = (1, 2, 3, 4, 5)
"""What `run_parity` runs unless told otherwise (the levels on the user's model)."""

AVAILABLE_LEVELS = (1, 2, 3, 4, 5, 6)
"""Level 6 (whole runs of the trainers, on a built-in tiny model) runs only when asked for."""

COMMAND_LEVELS = AVAILABLE_LEVELS
"""What `rlhf parity` runs: every level, level 6 with the config's PPO choices (~30 s more)."""

MODEL_LEVELS = ("2", "3", "4", "5")
"""The levels whose rows compare the user's model (`Row.level`); 1 and 6 do not."""

LEVEL_NAMES = {1: "shared functions, numpy vs torch vs JAX", 2: "forward passes",
               3: "losses and gradients", 4: "AdamW steps", 5: "decoding",
               6: "whole SFT / reward / PPO runs, built-in tiny Llama"}
"""What each level compares, as the progress lines name it."""


class _Progress:
    """One line on stderr as each level starts and one as it ends (its rows, failures and
    seconds), so a long `rlhf parity` shows where it is; silent when not ``enabled``."""

    def __init__(self, enabled: bool, levels_to_run: Sequence[int]):
        self.enabled = enabled
        self.levels = sorted(levels_to_run)

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"parity: {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def level(self, level: int, rows: list[Row]) -> Iterator[None]:
        start, before = time.perf_counter(), len(rows)
        self.say(f"level {level} ({LEVEL_NAMES[level]}) [{self.levels.index(level) + 1}/"
                 f"{len(self.levels)}] ...")
        yield
        new = rows[before:]
        failed = sum(not r.passed for r in new)
        self.say(f"level {level} done: {len(new)} rows, {failed} failed "
                 f"({time.perf_counter() - start:.1f} s)")


def _is_local(path: str | None) -> bool:
    return path is not None and (Path(path) / "config.json").is_file()


def _materialise(name_or_path: str, out: Path, *, kind: str, seed: int) -> Path:
    """A local HF directory of `kind` for `name_or_path` (a local dir or a hub name).

    A local directory of the right kind is used as it is. Otherwise the torch backend loads it
    (hub download, or a causal LM read as a value model: fresh score head seeded by `seed`, as
    reward-model training starts) and saves it under `out`, and both backends read that copy.
    """
    import torch

    from torch_rlhf.models import build_causal_lm, build_value_model

    if _is_local(name_or_path) and checkpoint_kind(name_or_path) == kind:
        return Path(name_or_path)
    torch.manual_seed(seed)
    if kind == "lm":
        model = build_causal_lm(name_or_path, dtype="fp32")
    else:
        model = build_value_model(name_or_path, dtype="fp32").model
    model.save_pretrained(out)
    return out


def _model_dirs(config, model_dir: str | None, tmp: Path) -> tuple[Path | None, Path | None]:
    """(actor directory, critic directory) as HF directories; None when there is none."""
    m, seed = config.model, config.seed
    if model_dir is not None:
        if checkpoint_kind(model_dir) == "value":
            return None, Path(model_dir)
        return Path(model_dir), _materialise(model_dir, tmp / "critic", kind="value", seed=seed)
    if m.actor_model_name_or_path is not None:
        actor = _materialise(m.actor_model_name_or_path, tmp / "actor", kind="lm", seed=seed)
    else:
        actor = build_checkpoint(m.actor_config, tmp / "actor", kind="lm", seed=seed)
    if m.critic_model_name_or_path is not None:
        critic = _materialise(m.critic_model_name_or_path, tmp / "critic", kind="value",
                              seed=seed)
    elif m.critic_config is not None:
        critic = build_checkpoint(m.critic_config, tmp / "critic", kind="value", seed=seed + 1)
    else:
        critic = _materialise(str(actor), tmp / "critic", kind="value", seed=seed)
    return actor, critic


def _tokenizer(config, model_dir: str | None, actor: Path | None, critic: Path | None):
    from transformers import AutoTokenizer

    from shared.data import prepare_tokenizer

    candidates = [model_dir] if model_dir is not None else []
    candidates += [config.model.tokenizer_name_or_path, actor, critic]
    for candidate in candidates:
        if candidate is None:
            continue
        local = Path(candidate)
        if local.is_dir() and not (local / "tokenizer_config.json").is_file():
            continue
        return prepare_tokenizer(AutoTokenizer.from_pretrained(str(candidate)),
                                 pad_with_eos=config.data.pad_with_eos)
    raise ValueError("no tokenizer: set model.tokenizer_name_or_path or save one with the model")


def _step_data(config, tokenizer, step: str, skipped: list[str]):
    from shared.data import DataError, build_step_data

    try:
        return build_step_data(config.data, tokenizer, step).train
    except (DataError, ValueError) as err:
        skipped.append(f"{step} data: {err}")
        return None


def _answer_ids(tokenizer, vocab_size: int) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]
    return np.asarray(ids or [0])


def _synthetic_answers(tokenizer, vocab_size: int, batch: int, length: int, seed: int):
    """Answers of different lengths drawn from the tokenizer's ordinary tokens, ending with
    EOS (when the tokenizer has one), padded with its pad id."""
    answers, mask = B.synthetic_answers(vocab_size, batch, length, seed=seed)
    pool = _answer_ids(tokenizer, vocab_size)
    answers = pool[answers % len(pool)]
    ends = mask.sum(-1)
    for row, n in enumerate(ends):
        if n < length and tokenizer.eos_token_id is not None:
            answers[row, n - 1] = tokenizer.eos_token_id
    return np.where(mask == 1, answers, tokenizer.pad_token_id), mask


def _check_vocab(pair: ModelPair, arrays: dict[str, np.ndarray], what: str) -> None:
    for key, value in arrays.items():
        if "ids" in key and value.size and int(value.max()) >= pair.vocab_size:
            raise ValueError(f"{what}: token id {int(value.max())} in {key} is outside the "
                             f"model's vocabulary of {pair.vocab_size}; use the model's tokenizer")


@contextlib.contextmanager
def _float32_on_cpu() -> Iterator[None]:
    """JAX on the CPU in float32 for the duration (torch is on the CPU already): the
    tolerances are CPU float32 ones, and a GPU's TF32 matmuls or an x64 switch left on by the
    caller would change the JAX side only."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def run_parity(
    config: Any,
    *,
    model_dir: str | None = None,
    levels_to_run: Sequence[int] = DEFAULT_LEVELS,
    num_rows: int = 4,
    print_table: bool = True,
) -> list[Row]:
    """Run the available parity levels on the config's (or `model_dir`'s) model and data.

    Args:
      config: a validated `shared.config.RLHFConfig`.
      model_dir: a saved HF directory (causal LM, or sequence-classification value model) to
        check instead of the config's models. A causal LM also serves as the critic's backbone
        (with a fresh score head, seeded by `config.seed`).
      levels_to_run: which of levels 1 to 6 (default 1-5; level 6 runs the built-in tiny
        Llama under the config's PPO choices, `iterations.level6_settings`).
      num_rows: examples taken from the start of each step's training data.
      print_table: print the per-level summary (`level_summary`), the table and the skipped
        items to stdout, and a progress line per level to stderr.

    Returns:
      The rows; a level or step that cannot run is reported as skipped, not as a row.
    """
    unknown = set(levels_to_run) - set(AVAILABLE_LEVELS)
    if unknown:
        raise ValueError(f"levels {sorted(unknown)} do not exist; available: "
                         f"{list(AVAILABLE_LEVELS)}")
    rows: list[Row] = []
    skipped: list[str] = []
    progress = _Progress(print_table, levels_to_run)
    with _float32_on_cpu():
        _run_levels(config, model_dir, levels_to_run, num_rows, rows, skipped, progress)
    if print_table:
        print(level_summary(rows, levels_to_run))
        print()
        print(format_table(rows))
        print(pass_counts(rows))
        for item in skipped:
            print(f"skipped: {item}")
    return rows


def _run_levels(config, model_dir, levels_to_run, num_rows, rows, skipped,
                progress: _Progress) -> None:
    if 1 in levels_to_run:
        from parity_tests.shared_cases import CASES, case_rows

        with progress.level(1, rows):
            for padding in B.PADDINGS:
                for case in CASES:
                    rows += case_rows(case, padding)
    if set(levels_to_run) & {2, 3, 4, 5}:
        with tempfile.TemporaryDirectory(prefix="rlhf-parity-") as tmp:
            rows += _model_levels(config, model_dir, Path(tmp), levels_to_run, num_rows,
                                  skipped, progress)
    if 6 in levels_to_run:
        with progress.level(6, rows):
            rows += _level6(config, skipped)


def _level6(config, skipped: list[str]) -> list[Row]:
    """Whole SFT / reward / PPO runs on the built-in tiny Llama under the config's PPO
    choices (`iterations.level6_settings`: preset and conventions, short-answer policy, ptx
    mode, gradient accumulation, EMA, sampling, pad_with_eos, LoRA / only_optimize)."""
    from parity_tests import iterations

    settings = iterations.level6_settings(config)
    with tempfile.TemporaryDirectory(prefix="rlhf-parity-6-") as tmp:
        dirs = iterations.build_level6_models(tmp)
        level6 = iterations.level6_config(tmp, dirs, **settings)
        label = f"built-in tiny llama, preset {level6.ppo.preset}"
        try:
            rows = iterations.level6_rows(*iterations.run_level6(level6, tmp), label=label)
        except RuntimeError as err:  # e.g. the dschat policy with no valid batch to reuse
            skipped.append(f"level 6: {err}")
            return []
    if iterations.KNOWN_DIFFERENT:
        skipped.append("level 6: PPO metrics " + ", ".join(iterations.KNOWN_DIFFERENT)
                       + " are aggregated differently by the backends (docs/parity.md)")
    return rows


def _model_levels(config, model_dir, tmp, levels_to_run, num_rows, skipped,
                  progress: _Progress) -> list[Row]:
    progress.say("loading the models and data of levels 2-5 ...")
    actor_dir, critic_dir = _model_dirs(config, model_dir, tmp)
    actor = load_pair(actor_dir, kind="lm") if actor_dir is not None else None
    critic = load_pair(critic_dir, kind="value") if critic_dir is not None else None
    if actor is None:
        skipped.append(f"actor levels: {model_dir} is a value model, not a causal LM")
    tokenizer = _tokenizer(config, model_dir, actor_dir, critic_dir)
    sft = _step_data(config, tokenizer, "sft", skipped)
    reward = _step_data(config, tokenizer, "reward", skipped)
    prompts = _step_data(config, tokenizer, "ppo", skipped)
    rows: list[Row] = []
    sft_rows = B.rows_of(sft, num_rows) if sft is not None else None
    prompt_rows = B.rows_of(prompts, num_rows) if prompts is not None else None
    for pair in (actor, critic):
        for what, arrays in (("sft data", sft_rows), ("ppo prompts", prompt_rows)):
            if pair is not None and arrays is not None:
                _check_vocab(pair, arrays, what)

    if 2 in levels_to_run:
        with progress.level(2, rows):
            if sft_rows is not None:
                rows += levels.forward_rows("sft data, right-padded", sft_rows["input_ids"],
                                            sft_rows["attention_mask"], lm=actor, value=critic)
            if prompt_rows is not None:
                # Left-padded prompts end on a real token: any prompt_length past the padding
                # reads the last one. (width itself, an empty answer part, makes torch's
                # gather_end_values call argmax on an empty axis.)
                width = prompt_rows["prompt_input_ids"].shape[1]
                rows += levels.forward_rows("ppo prompts, left-padded",
                                            prompt_rows["prompt_input_ids"],
                                            prompt_rows["prompt_attention_mask"], lm=actor,
                                            value=critic, prompt_length=width - 1)
    if 3 in levels_to_run:
        with progress.level(3, rows):
            rows += _level3(config, tokenizer, actor, critic, sft_rows, reward, prompt_rows,
                            num_rows, skipped)
    if 4 in levels_to_run:
        with progress.level(4, rows):
            rows += _level4(config, actor, actor_dir, sft, num_rows, skipped)
    if 5 in levels_to_run:
        with progress.level(5, rows):
            rows += _level5(config, tokenizer, actor, prompt_rows, skipped)
    return rows


def _level5(config, tokenizer, actor, prompt_rows, skipped) -> list[Row]:
    if actor is None or prompt_rows is None:
        skipped.append("level 5: needs a causal LM and PPO prompts")
        return []
    sampling = config.ppo.sampling
    try:
        return sampler_rows(
            actor, prompt_rows["prompt_input_ids"], prompt_rows["prompt_attention_mask"],
            max_new_tokens=config.data.max_answer_seq_len,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            seed=config.seed, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p)
    except LevelUnavailable as err:
        skipped.append(f"level 5: {err}")
        return []


def _level3(config, tokenizer, actor, critic, sft_rows, reward, prompt_rows, num_rows,
            skipped) -> list[Row]:
    from shared.data import PairwiseBatch

    rows: list[Row] = []
    if actor is not None and sft_rows is not None:
        rows += levels.sft_rows(actor, sft_rows, "sft data")
    if critic is not None and reward is not None:
        arrays = B.rows_of(reward, num_rows)
        loss = config.reward.loss
        # The configured loss only: the one the user's reward step trains with.
        name = {"bradley_terry": "bradley_terry", "dschat": "dschat_pairwise"}.get(loss, loss)
        data = {"pairwise": arrays} if isinstance(reward, PairwiseBatch) else {"ranking": arrays}
        reward_rows = levels.reward_rows(critic, "reward data", losses=(name,),
                                         pad_token_id=tokenizer.pad_token_id, **data)
        if not reward_rows:
            skipped.append(f"reward loss {loss!r}: no {type(reward).__name__} it applies to")
        rows += reward_rows
    if actor is None or critic is None or prompt_rows is None:
        skipped.append("level 3 PPO: needs an actor, a critic and PPO prompts")
        return rows
    prompt_ids = prompt_rows["prompt_input_ids"]
    answers, mask = _synthetic_answers(tokenizer, actor.vocab_size, prompt_ids.shape[0],
                                       config.data.max_answer_seq_len, config.seed)
    conventions = config.ppo.conventions
    prompt_mask = prompt_rows["prompt_attention_mask"]
    if conventions.mask_pad_tokens:  # as the PPO loop does: with pad == EOS, the EOS too
        mask = mask * (answers != tokenizer.pad_token_id)
        prompt_mask = prompt_mask * (prompt_ids != tokenizer.pad_token_id)
    rollout = levels.rollout_for(actor, critic, prompt_ids, prompt_mask, answers, mask,
                                 conventions=conventions, seed=config.seed)
    ptx = _ptx_rows(config, tokenizer, num_rows, skipped) or sft_rows
    ptx = {k: ptx[k] for k in ("input_ids", "attention_mask")} if ptx is not None else None
    unsup_coef = config.ppo.unsup_coef or 1.0  # a zero coefficient would hide the gradient
    rows += levels.ppo_rows(actor, critic, rollout, conventions=conventions, ptx=ptx,
                            unsup_coef=unsup_coef, label="ppo prompts + answers")
    return rows


def _level4(config, actor, actor_dir, sft, num_rows, skipped) -> list[Row]:
    from parity_tests.optimiser import optimiser_rows

    if actor is None or sft is None:
        skipped.append("level 4: needs a causal LM and SFT data")
        return []
    steps = 3
    rows = B.rows_of(sft, num_rows * steps)
    count = len(rows["input_ids"])
    batches = [{k: v[np.arange(i * num_rows, (i + 1) * num_rows) % count]
                for k, v in rows.items()} for i in range(steps)]
    return optimiser_rows(actor_dir, batches, optim=config.sft.optim, label="sft data",
                          total_steps=max(steps, config.sft.optim.num_warmup_steps + steps))


def _ptx_rows(config, tokenizer, num_rows, skipped) -> dict[str, np.ndarray] | None:
    from shared.data import DataError, build_ptx_data

    try:
        data = build_ptx_data(config.data, tokenizer)
    except (DataError, ValueError) as err:
        skipped.append(f"ptx data: {err}; the SFT rows stand in")
        return None
    return None if data is None else B.rows_of(data.train, num_rows)


class UnsupportedModelError(InputError):
    """The model cannot run on one of the backends: `rlhf parity` exits with 2 (an input
    error, `shared.errors`), before running anything, not 1 (a failed comparison)."""


def _hf_config(where: str, source: str | None, fresh: dict | None):
    """The `transformers` config of a model directory, hub name or fresh config kwargs,
    without loading any weights; None when there is no model."""
    import transformers

    if source is None and fresh is None:
        return None
    try:
        if source is not None:
            return transformers.AutoConfig.from_pretrained(source)
        return transformers.AutoConfig.for_model(**fresh)
    except ValueError:  # transformers lists every type it knows: too long for one line
        if source is not None and Path(source, "config.json").is_file():
            fresh = json.loads(Path(source, "config.json").read_text())
        model_type = (fresh or {}).get("model_type")
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is unknown to transformers "
            f"{transformers.__version__}, so the torch backend cannot build it") from None


def _model_sources(config, model_dir: str | None) -> list[tuple[str, Any, str]]:
    """`(where, HF config, kind)` of every model levels 2-5 build, `kind` "lm" or "value"
    (a causal LM also serves as the critic's backbone, a fresh head on it)."""
    m = config.model
    if model_dir is not None:
        hf_config = _hf_config("--model", model_dir, None)
        kinds = ("value",) if checkpoint_kind(model_dir) == "value" else ("lm", "value")
        return [("--model", hf_config, kind) for kind in kinds]
    actor = ("model.actor_model_name_or_path" if m.actor_model_name_or_path is not None
             else "model.actor_config")
    critic_path, critic_fresh = m.reward_model_source()
    critic = ("model.critic_config" if critic_fresh is not None
              else "model.critic_model_name_or_path" if m.critic_model_name_or_path is not None
              else "model.actor_model_name_or_path")
    return [(actor, _hf_config(actor, m.actor_model_name_or_path, m.actor_config), "lm"),
            (critic, _hf_config(critic, critic_path, critic_fresh), "value")]


def check_model_support(config, model_dir: str | None = None) -> None:
    """Refuse, in a second and before any level runs, a model one of the backends cannot
    build: the torch backend (a `transformers` model class of its type) and the JAX backend
    (its own `ModelConfig.from_hf`, whose message names the families it supports).

    Raises:
      UnsupportedModelError: one line naming the config key or flag, the model type and why.
    """
    import transformers

    from jax_rlhf.models import ModelConfig

    auto = {"lm": transformers.AutoModelForCausalLM,
            "value": transformers.AutoModelForSequenceClassification}
    for where, hf_config, kind in _model_sources(config, model_dir):
        if hf_config is None:
            continue
        model_type = hf_config.model_type
        if type(hf_config) not in auto[kind]._model_mapping:
            raise UnsupportedModelError(
                f"{where}: model_type {model_type!r} has no {auto[kind].__name__} in "
                "transformers, so the torch backend cannot build it")
        try:
            ModelConfig.from_hf(hf_config)
        except (ValueError, NotImplementedError) as err:
            raise UnsupportedModelError(
                f"{where}: model_type {model_type!r} cannot run on the JAX backend, and "
                f"`rlhf parity` needs both: {err}") from None


def level_summary(rows: Sequence[Row], levels_to_run: Sequence[int]) -> str:
    """A table of the levels run: rows, passed, failed (a level with no row, skipped)."""
    header = ("level", "what", "rows", "passed", "failed")
    body = []
    for level in sorted(levels_to_run):
        part = [r for r in rows if r.level == str(level)]
        passed = sum(r.passed for r in part)
        failed = len(part) - passed
        body.append((str(level), LEVEL_NAMES[level], str(len(part)), str(passed),
                     (f"{failed} FAILED" if failed else "0") + ("" if part else "  (skipped)")))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
             .rstrip() for line in [header, *body]]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def model_dependent(row: Row) -> bool:
    """Whether `row` compares the user's model (levels 2-5); level 1 (the `shared`
    functions) and level 6 (the built-in tiny Llama) pass or fail whatever the model."""
    return row.level in MODEL_LEVELS


def pass_counts(rows: Sequence[Row]) -> str:
    """The pass count split by whether a row depends on the model: the total alone would
    overstate how much of the model was compared."""
    on_model = [r for r in rows if model_dependent(r)]
    other = [r for r in rows if not model_dependent(r)]

    def count(part: list[Row]) -> str:
        return f"{sum(r.passed for r in part)}/{len(part)}"

    return (f"on your model (levels 2-5): {count(on_model)} passed; independent of it "
            f"(level 1 shared functions, level 6 built-in tiny Llama): {count(other)} passed")


def command_levels(args: argparse.Namespace) -> tuple[int, ...]:
    """The levels `rlhf parity` runs: `args.levels` when the command line has it (a sequence,
    or text such as "1,2,6"), else `COMMAND_LEVELS`."""
    levels_arg = getattr(args, "levels", None)
    if levels_arg is None:
        return COMMAND_LEVELS
    if isinstance(levels_arg, str):
        levels_arg = [part for part in levels_arg.replace(",", " ").split() if part]
    return tuple(int(level) for level in levels_arg)


def main(config: Any, args: argparse.Namespace) -> int:
    """Entry point of `rlhf parity`: 0 when every row passes, 1 when any fails, 2
    (`EXIT_INPUT`) when the model cannot run on one of the backends, checked before any
    level runs. Runs `command_levels(args)` (every level by default, level 6 under the
    config's PPO choices)."""
    model_dir = getattr(args, "model", None)
    levels_to_run = command_levels(args)
    if set(levels_to_run) & set(map(int, MODEL_LEVELS)):
        try:
            check_model_support(config, model_dir)
        except UnsupportedModelError as err:
            logger.error("rlhf parity: %s", err)
            return EXIT_INPUT
    rows = run_parity(config, model_dir=model_dir, levels_to_run=levels_to_run)
    failed = [r for r in rows if not r.passed]
    if not rows:
        logger.error("rlhf parity: nothing was compared")
        return 1
    logger.info("rlhf parity: %s", pass_counts(rows))
    if failed:
        logger.error("rlhf parity: %d of %d comparisons failed", len(failed), len(rows))
        return 1
    return 0
