"""``rlhf COMMAND --backend torch``: what each subcommand does on this backend.

``shared.cli`` parses the command line and the config, then calls :func:`run`. Launch
with ``deepspeed`` or ``torchrun`` for several processes (docs/torch.md); a plain
``python -m shared.cli ...`` runs as a world of one.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from shared.config import RLHFConfig
from shared.console import summary_table
from shared.errors import InputError, Interrupted
from shared.evaluation import decode_answers
from shared.runlog import prepare_run_dir

__all__ = ["chat", "run"]

logger = logging.getLogger("rlhf.torch")

_TRAIN_COMMANDS = ("sft", "rm", "ppo", "dpo", "pipeline")


def _cpu_threads() -> None:
    # torchrun and the deepspeed launcher give each worker OMP_NUM_THREADS=1; a plain
    # CPU process would otherwise use one intra-op thread per core, which for small
    # models on a shared machine is several times slower (threads spin on busy cores).
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        logger.info("CPU run: torch uses 1 intra-op thread (set OMP_NUM_THREADS to change)")


def _quiet_libraries() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19's own calls into torch APIs it has not migrated yet.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed.*is deprecated")


def run(command: str, config: RLHFConfig, args: Any) -> int:
    """Run ``command`` (pipeline, sft, rm, ppo, eval, chat, export) on ``config``.

    ``args`` is ``shared.cli``'s namespace: ``.config`` (the file), ``.resume``,
    ``.run_dir``, ``.actor`` / ``.critic`` (ppo), ``.model`` (eval, chat),
    ``.checkpoint`` / ``.out`` (export). Returns the exit status.
    """
    if command in ("parity", "bench"):
        entry = "parity_tests.run.main" if command == "parity" else "bench.run.main"
        raise ValueError(f"`rlhf {command}` compares or measures both backends: shared.cli "
                         f"runs it with {entry}(config, args), not through one backend's run() "
                         "(docs/torch.md)")
    _quiet_libraries()
    _cpu_threads()
    if command == "export":
        return _export(args)
    from torch_rlhf.deepspeed_config import init_distributed

    init_distributed(config.engine.torch.dist_backend)
    from torch_rlhf.distributed import is_main

    if not is_main():  # rank 0 speaks for the run, as DS-Chat's print_rank_0
        logging.getLogger().setLevel(logging.WARNING)
    if command in _TRAIN_COMMANDS:
        return _train(command, config, args)
    if command == "eval":
        return _eval(config, args)
    if command == "chat":
        model, tokenizer = _load_policy(config, getattr(args, "model", None))
        return chat(model, tokenizer, config)
    raise ValueError(f"unknown command {command!r}")


def _train(command: str, config: RLHFConfig, args: Any) -> int:
    from shared.pipeline import run_command
    from torch_rlhf.distributed import broadcast_object, is_main

    run_dir = None
    if is_main():
        run_dir = prepare_run_dir(config, config_path=getattr(args, "config", None),
                                  run_dir=getattr(args, "run_dir", None),
                                  resume=bool(getattr(args, "resume", False)), backend="torch")
    run_dir = Path(broadcast_object(str(run_dir) if run_dir else None))
    resume = bool(getattr(args, "resume", False))
    logger.info("rlhf %s (torch): run directory %s", command, run_dir)
    try:
        summary = run_command("torch", command, config, run_dir, resume=resume,
                              actor=getattr(args, "actor", None),
                              critic=getattr(args, "critic", None),
                              before_step=getattr(args, "before_step", None))
    except KeyboardInterrupt:
        raise Interrupted(run_dir, command) from None
    if is_main():
        print(summary_table(summary, run_dir), flush=True)
    return 0


def _load_policy(config: RLHFConfig, model_dir: str | None):
    from torch_rlhf.models import build_causal_lm
    from torch_rlhf.runtime import resolve_tokenizer

    model_dir = model_dir or config.model.actor_model_name_or_path
    if model_dir is None:
        raise InputError("pass --model DIR (a Hugging Face model directory, e.g. "
                         "<run>/ppo/final): the config builds its actor from scratch")
    tokenizer = resolve_tokenizer(config, model_dir)
    model = build_causal_lm(model_dir, dtype=config.model.dtype,
                            trust_remote_code=config.model.trust_remote_code)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    return model.to(device).eval(), tokenizer


_SHOWN_PROMPTS = 8
"""Prompts whose answers `rlhf eval` prints (the metric uses up to eval.max_prompts)."""


def _eval(config: RLHFConfig, args: Any) -> int:
    """``rlhf eval``: DeepSpeed-Chat's rw_eval for a reward model, its prompt_eval for a
    policy (or a baseline and a fine-tuned one); the report is ``shared.evaluation``'s."""
    from shared.evaluation import eval_roles, model_kind

    roles = eval_roles(config, args)
    if list(roles) == ["model"] and model_kind(roles["model"]) == "reward":
        return _reward_eval(config, roles["model"])
    return _prompt_eval(config, roles)


def _prompt_eval(config: RLHFConfig, roles: dict[str, str]) -> int:
    from shared.data import build_step_data
    from shared.evaluation import format_prompt_eval
    from torch_rlhf.distributed import is_main
    from torch_rlhf.evaluation import generate_answers, heldout_metrics, load_eval_prompts

    answers, heldout, shown = {}, {}, None
    for role, path in roles.items():
        model, tokenizer = _load_policy(config, path)
        prompts = load_eval_prompts(config, tokenizer)
        if shown is None:
            if prompts is None:  # eval.metric none: answers to the PPO step's eval prompts
                data = build_step_data(config.data, tokenizer, "ppo")
                prompts_for_answers = data.eval if data.eval is not None else data.train
            else:
                prompts_for_answers = prompts
            shown = prompts_for_answers.take(slice(0, _SHOWN_PROMPTS))
        heldout[role] = ({} if prompts is None
                         else heldout_metrics(model, tokenizer, config, prompts))
        answers[role] = generate_answers(model, shown, config, tokenizer, sample=False)
        del model
    if is_main():
        sys.stdout.write(format_prompt_eval(
            roles, [str(t) for t in shown.prompt_text],
            None if shown.reference is None else [str(t) for t in shown.reference],
            answers, heldout))
    return 0


def _reward_eval(config: RLHFConfig, path: str) -> int:
    from shared.evaluation import format_reward_eval, reward_eval_pairs
    from torch_rlhf.distributed import is_main
    from torch_rlhf.models import build_value_model, gather_end_values
    from torch_rlhf.runtime import resolve_tokenizer

    tokenizer = resolve_tokenizer(config, path)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = build_value_model(path, dtype=config.model.dtype,
                              trust_remote_code=config.model.trust_remote_code).to(device).eval()
    batch, texts = reward_eval_pairs(config.data, tokenizer, max_pairs=config.eval.max_prompts)
    size = config.reward.per_device_eval_batch_size
    scores = {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            ids = getattr(batch, f"{side}_input_ids")
            mask = getattr(batch, f"{side}_attention_mask")
            out = []
            for start in range(0, len(ids), size):
                t_ids = torch.from_numpy(ids[start:start + size]).long().to(device)
                t_mask = torch.from_numpy(mask[start:start + size]).long().to(device)
                values = model(t_ids, t_mask).float()
                out.append(gather_end_values(values, t_mask, prompt_length=1).cpu())
            scores[side] = torch.cat(out).numpy()
    if is_main():
        sys.stdout.write(format_reward_eval(path, texts, scores["chosen"], scores["rejected"]))
    return 0


def chat(model, tokenizer, config: RLHFConfig, *, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``rlhf chat``: :func:`shared.chat.chat_loop` (multi-turn, the history cut to the
    model's context) with this backend's greedy generation. Returns the exit status."""
    from shared.chat import chat_loop, chat_options
    from shared.model_limits import ModelLimits
    from torch_rlhf.generation import generate

    context = ModelLimits.from_hf_config(model.config.to_dict(), "model").context
    options = chat_options(config, tokenizer, context)
    device = next(model.parameters()).device

    def answer(ids) -> str:
        prompt = torch.tensor([list(ids)], dtype=torch.long, device=device)
        out = generate(model, prompt, torch.ones_like(prompt),
                       max_new_tokens=options.max_new_tokens, eos_token_id=options.eos_id,
                       pad_token_id=tokenizer.pad_token_id)
        return decode_answers(tokenizer, out.response.cpu().numpy(),
                              out.response_mask.cpu().numpy())[0]

    return chat_loop(answer, tokenizer, options, stdin=stdin, stdout=stdout, stderr=stderr)


def _export(args: Any) -> int:
    from shared.model_card import checkpoint_card, complete_export
    from torch_rlhf.checkpoint import CheckpointManager, export_checkpoint

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None:
        raise InputError("rlhf export needs --checkpoint: a checkpoint directory "
                         "(<run>/<step>/checkpoints/<tag>) or a step directory (<run>/<step>, "
                         "its latest checkpoint)")
    checkpoint = Path(checkpoint)
    if not (checkpoint / "COMPLETE").is_file():
        latest = CheckpointManager(checkpoint / "checkpoints", keep=1).latest()
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint at or under {checkpoint}")
        checkpoint = latest
    out = getattr(args, "out", None) or checkpoint.parent.parent / f"export-{checkpoint.name}"
    written = export_checkpoint(checkpoint, out)
    for directory in written:
        role = directory.name if len(written) > 1 else "final"
        complete_export(directory, checkpoint_card(checkpoint, backend="torch", role=role))
    logger.info("exported %s -> %s", checkpoint, ", ".join(map(str, written)))
    return 0
