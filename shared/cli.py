"""The ``rlhf`` command: one entry point, nine subcommands, two backends.

Every subcommand takes ``--config FILE`` (default: the shipped demo),
``--backend torch|jax`` (default: the config's ``backend``) and trailing
``key=value`` overrides (dotted keys, or DeepSpeed-Chat / NeMo-RLHF names such
as ``actor_zero_stage=3``). The config is loaded and validated here, without
importing either framework; the work itself is done by the backend's
``<backend>_rlhf.cli.run(command, config, args)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from shared.config import ConfigError, load_config, to_dict

__all__ = ["COMMANDS", "build_parser", "main"]

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
    "chat": ("talk to a trained model", "An interactive multi-turn prompt loop."),
    "eval": (
        "evaluate a model on held-out prompts",
        "Prompt evaluation (as DS-Chat's prompt_eval) and the configured eval metric.",
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
    "bench": (
        "measure throughput, MFU and memory",
        "Writes JSON and a markdown table (see docs/performance.md).",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="SFT, reward modelling and PPO with PyTorch/DeepSpeed or JAX backends.",
        epilog="Overrides: trailing key=value pairs, e.g. `rlhf ppo ppo.ppo_epochs=2 "
        "actor_zero_stage=3`. See docs/config.md for every key.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_line, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=description)
        p.add_argument("--config", type=Path, default=None,
                       help=f"YAML config (default: {DEMO_CONFIG.name}, the shipped demo)")
        p.add_argument("--backend", choices=("torch", "jax"), default=None,
                       help="backend to run on (default: the config's `backend`)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved, validated config as YAML and exit")
        if name in ("pipeline", "sft", "rm", "ppo"):
            p.add_argument("--resume", action="store_true",
                           help="continue the run in --run-dir from its last checkpoint")
            p.add_argument("--run-dir", type=Path, default=None,
                           help="run directory (default: <output_dir>/<run_name>)")
        if name == "ppo":
            p.add_argument("--actor", default=None, help="SFT model directory (actor, reference)")
            p.add_argument("--critic", default=None, help="reward model directory (critic, reward)")
        if name in ("chat", "eval", "parity", "export"):
            p.add_argument("--model", default=None,
                           help="Hugging Face model directory (default: from the config)")
        if name == "export":
            p.add_argument("--checkpoint", type=Path, default=None,
                           help="checkpoint directory to export")
            p.add_argument("--out", type=Path, default=None, help="output directory")
        if name == "bench":
            p.add_argument("--out", type=Path, default=None,
                           help="where to write results.json and results.md (default runs/bench)")
            p.add_argument("--quick", action="store_true",
                           help="smallest sizes only (a smoke run, minutes less)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides (dotted keys or DS-Chat/NeMo names)")
    return parser


_BOTH_BACKENDS = {"parity": "parity_tests.run", "bench": "bench.run"}
"""Commands that need both backends (they compare or measure them), so they are not
dispatched to either one: the module whose `main(config, args)` runs each."""


def _run_both_backends(command: str, config, args: argparse.Namespace) -> int:
    try:
        entry = importlib.import_module(_BOTH_BACKENDS[command]).main
    except ModuleNotFoundError as err:
        logger.error("rlhf %s needs both backends; %r is not installed: install with "
                     "`pip install -e .[torch,jax]` (or `make install`)", command, err.name)
        return 2
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
        return 2
    run = getattr(module, "run", None)
    if run is None:
        logger.error("rlhf %s: %s has no run() entry point", command, module_name)
        return 2
    try:
        return int(run(command, config, args) or 0)
    except NotImplementedError as err:
        logger.error("rlhf %s: not available on the %s backend yet: %s", command, backend, err)
        return 2


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    config_path = args.config or DEMO_CONFIG
    try:
        config = load_config(config_path, args.overrides)
    except ConfigError as err:
        logger.error("invalid config %s: %s", config_path, err)
        return 2
    args.config = config_path
    # `rlhf bench` and `rlhf parity` cover both backends unless one is named explicitly.
    args.explicit_backend = args.backend
    args.backend = args.backend or config.backend
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    return _run_backend(args.command, config, args)


if __name__ == "__main__":
    sys.exit(main())
