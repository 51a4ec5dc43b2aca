"""The three steps in one run directory, for either backend: SFT -> reward model -> PPO.

    run_pipeline("torch", config, run_dir)            # rlhf pipeline
    run_step("jax", config, run_dir, "reward")        # rlhf rm

Each step feeds the next through its final model: ``<run>/sft/final`` initialises the PPO
actor and reference (or, with ``pipeline_steps: [sft, dpo]``, the DPO policy and its frozen
reference), ``<run>/reward/final`` the PPO critic and reward model. The reward
model itself starts from a base model (``ModelConfig.reward_model_source``), never from
``<run>/sft/final``. Each step reads its own share of the data
(``data.data_split``, ``datasets[].steps``). With ``resume``, a step whose final model and
``summary.json`` entry exist is skipped, and an unfinished one continues from its latest
checkpoint; a run another backend wrote is refused (``shared.runlog.check_run_backend``).
The main process holds the run directory's lock (``shared.runlock``) while steps run.

A backend is a :class:`Backend` record naming its three trainer classes and its session
factory by module path, imported only when used, so this module never imports torch or
jax. Every trainer has the same constructor in both backends::

    SFTTrainer(config, run_dir=..., model_name_or_path=None, **session.trainer_kwargs)
    RewardTrainer(config, run_dir=..., model_name_or_path=None, **session.trainer_kwargs)
    PPOTrainer(config, run_dir=..., actor_model_name_or_path=None,
               critic_model_name_or_path=None, **session.trainer_kwargs)

and ``trainer.run(resume=False)`` returns the step's ``summary.json`` entry. The session
holds what the steps of one process share (torch: the run logger; JAX: the ``RunContext``
with its mesh and tokenizer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.console import attach_run_log
from shared.runlock import hold_run_dir
from shared.runlog import RunLogger, check_run_backend

__all__ = ["BACKENDS", "COMMAND_STEPS", "Backend", "Session", "final_model", "get_backend",
           "run_command", "run_pipeline", "run_step", "step_done"]

logger = logging.getLogger(__name__)

COMMAND_STEPS = {"sft": "sft", "rm": "reward", "ppo": "ppo", "dpo": "dpo"}
"""``rlhf`` subcommand -> pipeline step."""

BeforeStep = Callable[[str, Path], None]
"""Called with (step, run_dir) just before a step starts (`rlhf launch` starts the servers
the PPO step will call)."""


def _no_barrier() -> None:
    return None


@dataclasses.dataclass
class Session:
    """What the steps of one process's pipeline share.

    Attributes:
      run_logger: the run's ``metrics.jsonl`` / TensorBoard / ``summary.json`` writer.
      trainer_kwargs: extra keyword arguments of every trainer (torch ``run_logger``, JAX
        ``ctx``).
      barrier: waits for every process (between steps).
    """

    run_logger: RunLogger
    trainer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    barrier: Callable[[], None] = _no_barrier

    def close(self) -> None:
        self.run_logger.close()


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend's trainers and session factory, as ``"module:name"`` import targets."""

    name: str
    """``summary.json``'s ``backend``: ``"torch"`` or ``"jax"``."""
    trainers: Mapping[str, str]
    """Step (``sft``, ``reward``, ``ppo``) -> trainer class."""
    session: str
    """``(config, run_dir) -> Session``."""

    def trainer(self, step: str) -> type:
        if step not in self.trainers:
            raise ValueError(f"step: {step!r} is invalid; allowed: {', '.join(self.trainers)}")
        return _load(self.trainers[step])

    def open_session(self, config: Any, run_dir: str | Path) -> Session:
        return _load(self.session)(config, Path(run_dir))


BACKENDS = {
    "torch": Backend("torch", {"sft": "torch_rlhf.sft:SFTTrainer",
                               "reward": "torch_rlhf.reward:RewardTrainer",
                               "ppo": "torch_rlhf.ppo:PPOTrainer",
                               "dpo": "torch_rlhf.dpo:DPOTrainer"},
                     session="torch_rlhf.runtime:open_session"),
    "jax": Backend("jax", {"sft": "jax_rlhf.train.sft:SFTTrainer",
                           "reward": "jax_rlhf.train.reward:RewardTrainer",
                           "ppo": "jax_rlhf.train.ppo:PPOTrainer",
                           "dpo": "jax_rlhf.train.dpo:DPOTrainer"},
                   session="jax_rlhf.train.common:open_session"),
}


def get_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is invalid; allowed: {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def final_model(run_dir: str | Path, step: str) -> Path | None:
    """``<run>/<step>/final`` when it holds a model, else None."""
    path = Path(run_dir) / step / "final"
    return path if (path / "config.json").is_file() else None


def step_done(run_dir: str | Path, step: str) -> bool:
    """Whether ``step`` finished in ``run_dir``: its final model and summary entry exist."""
    summary = Path(run_dir) / "summary.json"
    if final_model(run_dir, step) is None or not summary.is_file():
        return False
    return step in json.loads(summary.read_text())


def _trainer(backend: Backend, config: Any, run_dir: Path, step: str, session: Session, *,
             actor: str | None, critic: str | None):
    cls = backend.trainer(step)
    kwargs = dict(session.trainer_kwargs, run_dir=run_dir)
    if step == "sft":
        return cls(config, **kwargs)
    if step == "reward":
        # ModelConfig.reward_model_source: a base model, never this run's SFT model
        # (DeepSpeed-Chat's step 2 starts from its own pretrained --model_name_or_path).
        return cls(config, **kwargs)
    actor = actor or final_model(run_dir, "sft")
    if step == "dpo":  # the policy and its frozen reference start from the SFT model
        return cls(config, model_name_or_path=None if actor is None else str(actor), **kwargs)
    critic = critic or final_model(run_dir, "reward")
    return cls(config, actor_model_name_or_path=None if actor is None else str(actor),
               critic_model_name_or_path=None if critic is None else str(critic), **kwargs)


def run_step(backend: str | Backend, config: Any, run_dir: str | Path, step: str, *,
             resume: bool = False, actor: str | None = None, critic: str | None = None,
             session: Session | None = None) -> dict[str, Any]:
    """Runs one step (``sft``, ``reward``, ``ppo`` or ``dpo``) and records its
    ``summary.json`` entry and ``timings.<step>_wall_time``; returns the entry.

    Initial models: ``actor`` / ``critic`` (PPO; ``actor`` for DPO) when given, else this
    run's earlier final models (``<run>/sft/final``), else the config's.
    """
    backend = get_backend(backend)
    run_dir = Path(run_dir)
    own = session is None
    session = session or backend.open_session(config, run_dir)
    try:
        with _writing(run_dir, backend, session, resume=resume):
            start = time.perf_counter()
            logger.info("%s: step %s in %s", backend.name, step, run_dir)
            trainer = _trainer(backend, config, run_dir, step, session, actor=actor,
                               critic=critic)
            entry = trainer.run(resume=resume)
            del trainer
            gc.collect()  # the step's engines and device buffers
            session.barrier()
            summary = session.run_logger.update_summary(**{step: entry, "backend": backend.name})
            timings = dict(summary.get("timings", {}))
            timings[f"{step}_wall_time"] = round(time.perf_counter() - start, 3)
            session.run_logger.update_summary(timings=timings)
            return entry
    finally:
        if own:
            session.close()


@contextlib.contextmanager
def _writing(run_dir: Path, backend: Backend, session: Session, *,
             resume: bool) -> Iterator[None]:
    """Holds the run directory's lock (main process) and, on ``resume``, refuses a run
    another backend wrote."""
    with hold_run_dir(run_dir, is_main=session.run_logger.is_main):
        if resume:
            check_run_backend(run_dir, backend.name)
        yield


def run_pipeline(backend: str | Backend, config: Any, run_dir: str | Path, *,
                 resume: bool = False, session: Session | None = None,
                 before_step: BeforeStep | None = None) -> dict[str, Any]:
    """``config.pipeline_steps`` in order in ``run_dir``; returns the summary, whose
    ``timings`` has ``<step>_wall_time`` per step and ``pipeline_wall_time``."""
    backend = get_backend(backend)
    run_dir = Path(run_dir)
    own = session is None
    session = session or backend.open_session(config, run_dir)
    start = time.perf_counter()
    try:
        with _writing(run_dir, backend, session, resume=resume):
            session.run_logger.update_summary(backend=backend.name)
            for step in config.pipeline_steps:
                if resume and step_done(run_dir, step):
                    logger.info("pipeline: %s already finished in %s; skipping", step, run_dir)
                    continue
                if before_step is not None:
                    before_step(step, run_dir)
                run_step(backend, config, run_dir, step, resume=resume, session=session)
            summary = session.run_logger.update_summary()
            timings = dict(summary.get("timings", {}))
            timings["pipeline_wall_time"] = round(time.perf_counter() - start, 3)
            return session.run_logger.update_summary(timings=timings)
    finally:
        if own:
            session.close()


def run_command(backend: str | Backend, command: str, config: Any, run_dir: str | Path, *,
                resume: bool = False, actor: str | None = None,
                critic: str | None = None,
                before_step: BeforeStep | None = None) -> dict[str, Any]:
    """``rlhf pipeline|sft|rm|ppo|dpo`` in ``run_dir`` (already prepared:
    ``shared.runlog.prepare_run_dir``); returns the run's summary."""
    backend = get_backend(backend)
    session = backend.open_session(config, Path(run_dir))
    if session.run_logger.is_main:
        attach_run_log(run_dir)  # everything logged so far and from now on: <run_dir>/run.log
    try:
        with _writing(Path(run_dir), backend, session, resume=resume):
            if command == "pipeline":
                return run_pipeline(backend, config, run_dir, resume=resume, session=session,
                                    before_step=before_step)
            if command not in COMMAND_STEPS:
                raise ValueError(f"command: {command!r} is invalid; allowed: pipeline, "
                                 f"{', '.join(COMMAND_STEPS)}")
            if before_step is not None:
                before_step(COMMAND_STEPS[command], Path(run_dir))
            run_step(backend, config, run_dir, COMMAND_STEPS[command], resume=resume,
                     actor=actor, critic=critic, session=session)
            return session.run_logger.update_summary()
    finally:
        session.close()
