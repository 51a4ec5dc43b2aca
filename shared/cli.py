"""The ``rlhf`` command: one entry point, its subcommands, two backends.

Every subcommand takes ``--config FILE`` (default: the shipped demo),
``--backend torch|jax`` (default: the config's ``backend``) and trailing
``key=value`` overrides (dotted keys, or DeepSpeed-Chat / NeMo-RLHF names such
as ``actor_zero_stage=3``). DeepSpeed-Chat's own flag forms work too:
``--actor_zero_stage=3``, ``--actor-zero-stage 3``, a bare ``--gradient_checkpointing``
(true), ``--data_path a b``; ``rlhf sft`` and ``rlhf rm`` read the step-1/2 names
(``--model_name_or_path``, ``--zero_stage``, ``--lora_dim``) as those steps do. The
``--local_rank=N`` the ``deepspeed`` launcher adds is accepted and ignored (the rank
comes from the environment). The config is loaded and validated here, without
importing either framework; the work itself is done by the backend's
``<backend>_rlhf.cli.run(command, config, args)``.

Failures: every expected one is one line naming what and where (``shared.errors``), with
exit status 2 for bad input (config, data, arguments, model, tokenizer, checkpoint), 1 for
a run that failed, 130 for Ctrl-C; ``--debug`` (or ``RLHF_DEBUG=1``) adds the traceback. In a
multi-process run rank 0 reports; the other ranks add one line only for run-time failures.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import time
from pathlib import Path

from shared.config import ConfigError, foreign_engine_keys, load_config, to_dict
from shared.console import NORMAL, QUIET, VERBOSE
from shared.console import configure as configure_console
from shared.errors import (
    EXIT_INPUT,
    EXIT_RUN,
    InputError,
    ModelSourceError,
    check_model_source,
    describe,
    hub_offline,
    hub_reachable,
    one_line,
    process_rank,
)
from shared.serving.command import add_serve_arguments, serve_command

__all__ = ["COMMANDS", "build_parser", "flags_to_overrides", "main"]

logger = logging.getLogger("rlhf")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# name -> (help line, description)
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": (
        "run SFT, reward model and PPO in order, each feeding the next",
        "Runs the steps in `pipeline_steps` (default sft, reward, ppo) in one run directory: the "
        "SFT model initialises the actor and reference, the reward model the critic and reward.",
    ),
    "sft": ("step 1: supervised fine-tuning", "Trains the actor on demonstrations."),
    "rm": ("step 2: reward-model training", "Trains a reward model on comparisons."),
    "ppo": (
        "step 3: PPO against the reward model",
        "Trains the actor (and critic) with PPO; `--actor`/`--critic` point at the step-1/2 "
        "models (default: model.actor_model_name_or_path / model.critic_model_name_or_path).",
    ),
    "dpo": (
        "offline DPO on comparisons, from the SFT model",
        "Trains the policy with DPO (or IPO, cDPO: the `dpo:` section) on the comparisons "
        "the reward step reads, against a frozen reference = its starting weights; `--actor` "
        "points at the SFT model (default: model.actor_model_name_or_path). In a pipeline: "
        "`pipeline_steps: [sft, dpo]`.",
    ),
    "chat": ("talk to a trained model", "An interactive multi-turn prompt loop."),
    "eval": (
        "evaluate a policy or a reward model on held-out data",
        "Detects what --model is. A policy: its answers to held-out prompts beside the "
        "expected ones and the configured eval metric; with --model-baseline and "
        "--model-finetune, both side by side (DS-Chat's prompt_eval). A reward model "
        "(*ForSequenceClassification): scores of chosen vs rejected on the pairwise eval "
        "data, pair accuracy and the score distribution (DS-Chat's rw_eval).",
    ),
    "parity": (
        "check that both backends compute the same numbers on your model and data",
        "Loads the model into both backends, compares forward, losses, gradients, optimiser "
        "steps, generation and PPO iterations, prints a table and exits non-zero on failure.",
    ),
    "export": (
        "export a checkpoint as a Hugging Face model directory",
        "Consolidates a (sharded) checkpoint into safetensors plus config and tokenizer.",
    ),
    "serve": (
        "serve a reward model, the initial policy, the critic or a reward function over HTTP",
        "NeMo-RLHF's served roles: the PPO actor calls the server named by "
        "ppo.reward_model.url / ppo.initial_policy.url / ppo.critic.url / "
        "ppo.reward_function: http://... instead of loading the model; a critic server also "
        "trains the critic (docs/serving.md).",
    ),
    "launch": (
        "run the pipeline with the served roles the config names started on this machine",
        "NeMo-RLHF's four jobs on one machine: runs the config's pipeline; just before PPO "
        "it starts `rlhf serve` for ppo.reward_model.url / ppo.initial_policy.url / "
        "ppo.critic.url on "
        "localhost, waits for them, and stops them when the run ends (docs/serving.md).",
    ),
    "bench": (
        "measure throughput, MFU and memory",
        "Writes JSON and a markdown table (see docs/performance.md).",
    ),
    "plan": (
        "estimate a PPO run's per-device memory and whether it fits",
        "Counts, per model the run builds (actor, reference, critic, reward model), the "
        "weights, gradients, optimiser states, activations, KV cache and logits per device "
        "for the config's dtype, ZeRO stages, offload, LoRA, batch sizes and lengths; shows the "
        "peak phase, a verdict against --device-memory and DeepSpeed-Chat's rule of thumb "
        "(docs/plan.md). Builds nothing, imports no framework; exit status 1 when it does not "
        "fit.",
    ),
    "plot": (
        "draw a run's metrics as PNG curves, or compare runs",
        "One RUN_DIR: redraws <RUN_DIR>/plots/ (one PNG per step, and the held-out metric). "
        "Several: overlays them, one colour per run, into --out (default ./plots-compare). "
        "Needs no config and no backend (docs/monitoring.md).",
    ),
}


_DEBUG_HELP = ("on a failure, print the full traceback after the one-line message "
               "(also RLHF_DEBUG=1)")
_LOCAL_RANK_HELP = ("set by the deepspeed launcher; ignored (the rank comes from the "
                    "LOCAL_RANK environment variable)")


def _verbosity_flags(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_const", const=VERBOSE,
                       dest="verbosity", default=default,
                       help="also print library messages and every metric line (all of "
                            "them are always in <run_dir>/run.log)")
    group.add_argument("-q", "--quiet", action="store_const", const=QUIET, dest="verbosity",
                       default=default, help="print only warnings, errors and the results")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="SFT, reward modelling and PPO with PyTorch/DeepSpeed or JAX backends.",
        epilog="Overrides: trailing key=value pairs, e.g. `rlhf ppo ppo.ppo_epochs=2 "
        "actor_zero_stage=3`. See docs/config.md for every key. Exit status: 0 success, "
        "2 bad input (config, data, arguments, model, tokenizer, checkpoint), 1 a run that "
        "failed, 130 interrupted (Ctrl-C); a failure is one line unless --debug.",
    )
    parser.add_argument("--debug", action="store_true",
                        help=_DEBUG_HELP)
    _verbosity_flags(parser, argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=_LOCAL_RANK_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=description)
        if name == "plot":  # reads run directories: no config, no backend
            p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
            p.add_argument("--out", type=Path, default=None,
                           help="where the PNGs go (default: <RUN_DIR>/plots for one run, "
                                "./plots-compare for several)")
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help=_DEBUG_HELP)
            continue
        p.add_argument("--config", type=Path, default=None,
                       help=f"YAML config (default: {DEMO_CONFIG.name}, the shipped demo)")
        p.add_argument("--backend", choices=("torch", "jax"), default=None,
                       help="backend to run on (default: the config's `backend`)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved, validated config as YAML and exit")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=_DEBUG_HELP)
        _verbosity_flags(p, argparse.SUPPRESS)
        p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS,
                       help=_LOCAL_RANK_HELP)
        if name in ("pipeline", "sft", "rm", "ppo", "dpo", "launch"):
            p.add_argument("--resume", action="store_true",
                           help="continue the run in --run-dir from its last checkpoint")
            p.add_argument("--run-dir", type=Path, default=None,
                           help="run directory (default: <output_dir>/<run_name>)")
        if name == "ppo":
            p.add_argument("--actor", default=None, help="SFT model directory (actor, reference)")
            p.add_argument("--critic", default=None, help="reward model directory (critic, reward)")
        if name == "dpo":
            p.add_argument("--actor", default=None,
                           help="SFT model directory (the policy and its frozen reference)")
        if name in ("chat", "eval", "parity", "export", "serve"):
            p.add_argument("--model", default=None,
                           help="Hugging Face model directory (default: from the config)")
        if name == "serve":
            add_serve_arguments(p)
        if name == "eval":
            p.add_argument("--model-baseline", default=None,
                           help="with --model-finetune: DeepSpeed-Chat's prompt_eval, the two "
                                "policies' answers side by side and the held-out metric of each")
            p.add_argument("--model-finetune", default=None,
                           help="the fine-tuned policy compared with --model-baseline")
        if name == "export":
            p.add_argument("--checkpoint", type=Path, default=None,
                           help="checkpoint directory to export")
            p.add_argument("--out", type=Path, default=None, help="output directory")
        if name == "plan":
            p.add_argument("--world-size", type=int, default=1,
                           help="devices the trained models are partitioned over (ZeRO / "
                                "fsdp; default 1)")
            p.add_argument("--device-memory", type=float, default=80.0, metavar="GiB",
                           help="memory of one device in GiB (default 80, an A100/H100 80GB)")
            p.add_argument("--json", action="store_true",
                           help="print the estimate as JSON instead of the table")
        if name == "bench":
            p.add_argument("--out", type=Path, default=None,
                           help="where to write results.json and results.md (default runs/bench)")
            p.add_argument("--quick", action="store_true",
                           help="smallest sizes only (a smoke run, minutes less)")
            p.add_argument("--variants", action="store_true",
                           help="also every other generation variant (SDPA, bf16 torch path, "
                                "rollout_decode static and compiled)")
            p.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                           help="rewrite docs/performance.md's 'Latest run' section (default: "
                                "only a full default run does)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides (dotted keys or DS-Chat/NeMo names)")
    return parser


_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _is_value(token: str) -> bool:
    return not token.startswith("-") or bool(_NUMBER.fullmatch(token))


def flags_to_overrides(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Rewrites DeepSpeed-Chat style flags that are not options of ``rlhf`` into
    ``key=value`` overrides: ``--actor_zero_stage=3`` and ``--actor-zero-stage 3`` ->
    ``actor_zero_stage=3``, a bare ``--gradient_checkpointing`` -> ``...=true``,
    ``--data_path a b`` -> ``data_path=a b``. ``--run_dir`` is read as ``--run-dir``.
    Options ``rlhf`` knows, and everything before the command, are left alone."""
    commands = next(a for a in parser._actions  # noqa: SLF001
                    if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001
    start = next((i for i, t in enumerate(argv) if t in commands), None)
    if start is None:
        return list(argv)
    known = commands[argv[start]]._option_string_actions  # noqa: SLF001
    # The overrides go last, in one run: argparse takes a positional list only once.
    out, overrides, i = list(argv[: start + 1]), [], start + 1
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            overrides.extend(argv[i:])
            break
        if not token.startswith("--"):
            (out if token.startswith("-") else overrides).append(token)
            continue
        name, eq, value = token[2:].partition("=")
        dashed = "--" + name.replace("_", "-")
        underscored = "--" + name.replace("-", "_")
        option = next((o for o in (f"--{name}", dashed, underscored) if o in known), None)
        if option is not None:
            out.append(option + eq + value)
            if not eq and known[option].nargs != 0 and i < len(argv):
                out.append(argv[i])
                i += 1
            continue
        if not eq:
            values = []
            while i < len(argv) and _is_value(argv[i]) and "=" not in argv[i]:
                values.append(argv[i])
                i += 1
            value = " ".join(values) if values else "true"
        overrides.append(f"{name.replace('-', '_')}={value}")
    return out + overrides


_BOTH_BACKENDS = {"parity": "parity_tests.run", "bench": "bench.run"}
"""Commands that need both backends (they compare or measure them), so they are not
dispatched to either one: the module whose `main(config, args)` runs each."""


def _run_both_backends(command: str, config, args: argparse.Namespace) -> int:
    try:
        entry = importlib.import_module(_BOTH_BACKENDS[command]).main
    except ModuleNotFoundError as err:
        logger.error("rlhf %s needs both backends; %r is not installed: install with "
                     "`pip install -e .[torch,jax]` (or `make install`)", command, err.name)
        return EXIT_INPUT
    if command == "bench":  # both backends unless --backend names one
        args = argparse.Namespace(**{**vars(args), "backend": args.explicit_backend})
    return int(entry(config, args) or 0)


def _run_backend(command: str, config, args: argparse.Namespace) -> int:
    if command in _BOTH_BACKENDS:
        return _run_both_backends(command, config, args)
    backend = args.backend
    module_name = f"{backend}_rlhf.cli"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing in (f"{backend}_rlhf", module_name):
            logger.error("rlhf %s: the %s backend is not built yet (%s is missing)",
                         command, backend, module_name)
        else:
            extra = "torch" if backend == "torch" else "jax"
            logger.error("rlhf %s --backend %s needs the package %r, which is not installed; "
                         "install it with `pip install -e .[%s]` (or `make install`)",
                         command, backend, missing, extra)
        return EXIT_INPUT
    run = getattr(module, "run", None)
    if run is None:
        logger.error("rlhf %s: %s has no run() entry point", command, module_name)
        return EXIT_INPUT
    try:
        return int(run(command, config, args) or 0)
    except NotImplementedError as err:
        logger.error("rlhf %s: not available on the %s backend yet: %s", command, backend, err)
        return EXIT_INPUT


def _model_sources(command: str, config, args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(where, name_or_path)`` of every model and tokenizer ``command`` will load from a
    directory or the Hub (``where``: the flag or config key that named it)."""
    model = config.model
    sources = []
    for flag in ("model_baseline", "model_finetune"):
        if getattr(args, flag, None) is not None:
            sources.append((f"--{flag.replace('_', '-')}", getattr(args, flag)))
    if command in ("chat", "eval", "parity", "serve") and not sources:
        if args.model is not None:
            sources.append(("--model", args.model))
        elif model.actor_model_name_or_path is not None:
            sources.append(("model.actor_model_name_or_path", model.actor_model_name_or_path))
    elif command in ("pipeline", "sft", "ppo", "dpo", "launch"):
        actor = getattr(args, "actor", None)
        if actor is not None:
            sources.append(("--actor", actor))
        elif model.actor_model_name_or_path is not None:
            sources.append(("model.actor_model_name_or_path", model.actor_model_name_or_path))
    if command in ("pipeline", "rm", "ppo", "launch"):
        critic = getattr(args, "critic", None)
        if critic is not None:
            sources.append(("--critic", critic))
        elif model.critic_model_name_or_path is not None:
            sources.append(("model.critic_model_name_or_path", model.critic_model_name_or_path))
    if command not in ("export", "bench") and model.tokenizer_name_or_path is not None:
        sources.append(("model.tokenizer_name_or_path", model.tokenizer_name_or_path))
    if command in ("pipeline", "ppo", "launch") and model.reward_tokenizer_name_or_path is not None:
        sources.append(("model.reward_tokenizer_name_or_path",
                        model.reward_tokenizer_name_or_path))
    return sources


def _check_sources(command: str, config, args: argparse.Namespace) -> None:
    """Fails in seconds, naming the flag or key, on a model or tokenizer that cannot be
    loaded, before a framework is imported or a run directory made."""
    cached = []
    for where, name in _model_sources(command, config, args):
        what = "tokenizer" if "tokenizer" in where else "model"
        try:
            if check_model_source(name, what=what) == "cache":
                cached.append(name)
        except ModelSourceError as err:
            raise ModelSourceError(f"{where}: {err}") from None
    checkpoint = getattr(args, "checkpoint", None)
    if command == "export" and checkpoint is not None and not Path(checkpoint).exists():
        raise InputError(f"--checkpoint: {checkpoint} does not exist")
    if cached and not hub_offline() and "huggingface_hub" not in sys.modules \
            and not hub_reachable():
        # The Hub client would retry for minutes before falling back to the cache.
        os.environ["HF_HUB_OFFLINE"] = "1"
        logger.warning("the Hugging Face Hub is unreachable: loading %s from the local cache "
                       "(HF_HUB_OFFLINE=1)", ", ".join(cached))


_QUIET_RANK_EXIT_DELAY_S = 1.0


def _report(exc: BaseException, *, command: str, debug: bool) -> int:
    """Logs ``exc`` as one line (rank 0; other ranks only run-time failures) or, when it
    is unexpected, with its traceback; returns the exit status."""
    failure = describe(exc)
    rank = process_rank()
    prefix = f"rank {rank}: " if rank else ""
    trace = exc if debug else None
    if failure is None:  # not an expected failure: a bug, whose traceback is needed
        if rank == 0 or debug:
            logger.error("%srlhf %s: unexpected %s (please report it with this traceback):",
                         prefix, command, type(exc).__name__, exc_info=exc)
        else:
            logger.error("%s%s: %s (rank 0 prints the traceback)", prefix, type(exc).__name__,
                         one_line(str(exc), limit=300))
        return EXIT_RUN
    if rank == 0 or debug or failure.exit_code == EXIT_RUN:
        logger.error("%s%s", prefix, failure.message, exc_info=trace)
    else:
        # Silent: rank 0 reports the same failure. Exiting at once could let the launcher
        # stop rank 0 before it has printed it.
        time.sleep(_QUIET_RANK_EXIT_DELAY_S)
    return failure.exit_code


def _plot(args: argparse.Namespace) -> int:
    """``rlhf plot RUN_DIR [RUN_DIR ...] [--out DIR]`` (``shared.plots``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise InputError(f"rlhf plot needs matplotlib ({err}); `pip install matplotlib`") from None
    from shared.plots import plot_run, plot_runs

    if len(args.run_dirs) == 1:
        paths = plot_run(args.run_dirs[0], out_dir=args.out)
    else:
        paths = plot_runs(args.run_dirs, args.out or Path("plots-compare"))
    if not paths:
        raise InputError(f"{', '.join(map(str, args.run_dirs))}: no metrics to plot "
                         "(metrics.jsonl holds no numbers yet)")
    print(f"rlhf plot: wrote {len(paths)} PNG(s) to {paths[0].parent}: "
          + ", ".join(p.name for p in paths))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "plot":
        return _plot(args)
    config_path = args.config or DEMO_CONFIG
    try:
        config = load_config(config_path, args.overrides, command=args.command)
    except ConfigError as err:
        raise ConfigError(f"invalid config {config_path}: {err}") from err
    args.config = config_path
    # `rlhf bench` and `rlhf parity` cover both backends unless one is named explicitly.
    args.explicit_backend = args.backend
    args.backend = args.backend or config.backend
    if args.command not in _BOTH_BACKENDS:
        foreign = foreign_engine_keys(config, args.backend)
        if foreign:
            logger.warning("the %s backend ignores %s (set for the other backend)",
                           args.backend, ", ".join(foreign))
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    if args.command == "plan":  # reads configs only: no model source is opened
        from shared.plan_report import main as plan_main

        return plan_main(config, args)
    _check_sources(args.command, config, args)
    if args.command == "serve":
        return serve_command(config, args)
    if args.command == "launch":
        from shared.serving.launch import Launcher

        launcher = Launcher(config, args)
        args.before_step = launcher.before_step
        try:
            return _run_backend("pipeline", config, args)
        finally:
            launcher.stop()
    return _run_backend(args.command, config, args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(flags_to_overrides(sys.argv[1:] if argv is None else argv, parser))
    configure_console(getattr(args, "verbosity", NORMAL))
    debug = bool(getattr(args, "debug", False)) or os.environ.get("RLHF_DEBUG", "") not in (
        "", "0")
    try:
        return _run(args)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 (KeyboardInterrupt too: exit status 130)
        return _report(exc, command=args.command, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
