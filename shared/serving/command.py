"""`rlhf serve ROLE`: builds the role's handler (the backend's for a model, `FunctionHandler`
for a rule-based reward) and serves it until Ctrl-C or SIGTERM (docs/serving.md)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from shared.errors import InputError

__all__ = ["DEFAULT_PORTS", "SERVE_ROLES", "add_serve_arguments", "serve_command"]

SERVE_ROLES = ("reward", "initial-policy", "critic", "function")
DEFAULT_PORTS = {"reward": 5555, "initial-policy": 5556, "critic": 5557, "function": 5558}
"""NeMo-RLHF's guide: 5555 reward model, 5556 initial policy, 5557 critic."""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("role", choices=SERVE_ROLES,
                   help="reward: end scores of a reward model; initial-policy: per-token "
                        "log-probs of the reference model; critic: the PPO critic (values "
                        "and its training steps); function: a rule-based reward")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: NeMo's, reward 5555, initial-policy 5556, critic "
                        "5557, function 5558)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="critic: where its checkpoints go (default: "
                        "<output_dir>/critic-server)")
    p.add_argument("--world-size", type=int, default=1,
                   help="critic: the PPO actor's processes (they fix the run's critic steps, "
                        "the length of its LR schedule; default 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1; 0.0.0.0 for other nodes)")
    p.add_argument("--function", default=None,
                   help="module:function of a function server (called with prompt and "
                        "answer text, returns a float)")
    p.add_argument("--max-batch-rows", type=int, default=64,
                   help="rows of concurrent requests computed in one batch (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests beyond those that queued "
                        "while the last one computed (default 0: docs/performance.md)")
    p.add_argument("--max-request-mb", type=float, default=64.0,
                   help="largest request body accepted, MiB (default 64)")


def make_handler(role: str, config: Any, args: argparse.Namespace):
    """The handler `rlhf serve` runs: ``--model`` (or the model the run would load for the
    role) on ``args.backend``, or ``--function`` for the function role."""
    if role == "function":
        if not args.function:
            raise InputError("rlhf serve function: --function module:function is required")
        from shared.serving.function import FunctionHandler

        return FunctionHandler(args.function)
    if args.function:
        raise InputError(f"rlhf serve {role}: --function is for the function role only")
    if role == "critic":
        return make_critic_handler(config, args)
    model = args.model or (config.model.actor_model_name_or_path if role == "initial-policy"
                           else config.model.reward_model_source()[0])
    if model is None:
        raise InputError(f"rlhf serve {role}: --model DIR is required (the config names no "
                         "trained model for this role)")
    module = importlib.import_module(f"{args.backend}_rlhf.serving")
    handler_cls = module.TorchRoleHandler if args.backend == "torch" else module.JaxRoleHandler
    return handler_cls(role, model, config)


def make_critic_handler(config: Any, args: argparse.Namespace):
    """The critic server's handler: the backend's critic (``--model``, else the model the
    PPO run would load as critic, else a fresh ``model.critic_config`` one) trained as in
    process, with `shared.serving.critic_handler`'s step rule and checkpoints."""
    from pathlib import Path

    from shared.serving.critic_handler import CriticHandler

    if args.world_size < 1:
        raise InputError(f"rlhf serve critic: --world-size {args.world_size} must be >= 1")
    model = args.model or config.model.reward_model_source()[0]
    module = importlib.import_module(f"{args.backend}_rlhf.critic")
    trainer_cls = module.TorchCritic if args.backend == "torch" else module.JaxCritic
    trainer = trainer_cls(config, None if model is None else str(model),
                          world_size=args.world_size)
    checkpoints = args.checkpoint_dir or Path(config.output_dir) / "critic-server"
    return CriticHandler(trainer, checkpoint_dir=checkpoints)


def serve_command(config: Any, args: argparse.Namespace) -> int:
    from shared.serving.server import ServerLimits, serve

    limits = ServerLimits(max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms,
                          max_request_bytes=int(args.max_request_mb * 2**20))
    if limits.max_batch_rows < 1 or limits.max_wait_ms < 0 or limits.max_request_bytes < 1:
        raise InputError("rlhf serve: --max-batch-rows must be >= 1, --max-wait-ms >= 0 and "
                         "--max-request-mb > 0")
    handler = make_handler(args.role, config, args)
    port = args.port if args.port is not None else DEFAULT_PORTS[args.role]
    serve(handler, host=args.host, port=port, limits=limits)
    return 0
