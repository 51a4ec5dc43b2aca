"""The console: what reaches it, what goes only to <run_dir>/run.log, the closing table."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from shared import console


@pytest.fixture
def configured():
    """`console.configure` on a captured stream; undone afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    # other tests quiet some loggers (bench, parity level 6): the defaults here
    names = ("shared", "torch_rlhf", "jax_rlhf", "rlhf", "deepspeed", "DeepSpeed", "absl",
             "orbax")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.NOTSET)

    def setup(verbosity=console.NORMAL):
        console.configure(verbosity, stream=stream)
        return stream

    yield setup
    for key in ("console", "run_log"):
        handler = console._state.pop(key, None)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
    logging.captureWarnings(False)
    root.setLevel(level)
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)


def _emit_everything():
    # a logger of our own that no other test has set a level on or disabled
    own = logging.getLogger("rlhf.console_test")
    own.info("own info")
    own.info("file only", extra=console.FILE_ONLY)
    logging.getLogger("rlhf").warning("own warning")
    logging.getLogger("absl").info("library chatter")
    logging.getLogger("DeepSpeed").warning("library warning")
    logging.getLogger("orbax").error("library error")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pytest records warnings around each test; route this one through logging as
        # `configure` does in a real run (off first: captureWarnings(True) twice is a no-op)
        logging.captureWarnings(False)
        logging.captureWarnings(True)
        warnings.warn("a FutureWarning of some library", FutureWarning, stacklevel=1)


def test_default_console_shows_own_messages_and_library_errors_only(configured, tmp_path):
    stream = configured()
    _emit_everything()
    shown = stream.getvalue()
    assert "own info" in shown and "own warning" in shown and "library error" in shown
    for hidden in ("file only", "library chatter", "library warning", "FutureWarning"):
        assert hidden not in shown
    # everything, held from before the run directory was known, is in the run log
    path = console.attach_run_log(tmp_path)
    logging.getLogger("shared").info("after attach")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    for line in ("own info", "file only", "library chatter", "library warning",
                 "library error", "FutureWarning", "after attach"):
        assert line in text, line
    assert path == tmp_path / console.RUN_LOG


def test_quiet_and_verbose(configured):
    stream = configured(console.QUIET)
    _emit_everything()
    shown = stream.getvalue()
    assert "own warning" in shown and "library error" in shown
    assert "own info" not in shown and "library warning" not in shown
    stream.truncate(0)
    stream.seek(0)
    configured(console.VERBOSE)
    _emit_everything()
    shown = stream.getvalue()
    for line in ("own info", "file only", "library chatter", "library warning"):
        assert line in shown, line


def test_say_once_says_a_fact_once(configured, tmp_path):
    stream = configured()
    console.attach_run_log(tmp_path)
    log = logging.getLogger("torch_rlhf.generation")
    for _ in range(3):
        console.say_once(log, logging.INFO, "rollout path: %s", "module-test-once")
        console.say_once(log, logging.INFO, "quiet fact %d", 7, console=False)
    assert stream.getvalue().count("rollout path: module-test-once") == 1
    assert "quiet fact 7" not in stream.getvalue()
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert (tmp_path / console.RUN_LOG).read_text().count("quiet fact 7") == 1


def test_stdout_to_log_keeps_library_prints_off_stdout(configured, tmp_path, capsys):
    configured()
    console.attach_run_log(tmp_path)
    with console.stdout_to_log("deepspeed.stdout"):
        print("DeepSpeed op built successfully")
        print("partial line", end="")
    assert capsys.readouterr().out == ""
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / console.RUN_LOG).read_text()
    assert "DeepSpeed op built successfully" in text and "partial line" in text


@pytest.mark.parametrize(("total", "interval", "lines", "expected"), [
    (1350, 1, 4, 338), (80, 1, 4, 20), (10, 3, 4, 3), (7, 1, 4, 2), (100, 1, 0, 0),
    (3, 1, 4, 1),
])
def test_console_every(total, interval, lines, expected):
    every = console.console_every(total, log_interval=interval, lines=lines)
    assert every == expected
    if every:
        assert every % interval == 0
        assert total // every <= lines


def test_summary_table_says_before_and_after():
    summary = {
        "backend": "torch",
        "sft": {"eval_loss": 0.4869, "eval_perplexity": 1.627, "steps": 1350,
                "heldout": {"arithmetic_accuracy": 0.4406, "arithmetic_accuracy_greedy": 0.7125},
                "final_model": "/r/sft/final", "timings": {"wall_time": 17.9}},
        "reward": {"eval_accuracy": 0.9896, "steps": 1560, "final_model": "/r/reward/final",
                   "timings": {"wall_time": 24.8}},
        "ppo": {"final_reward": 3.14, "final_kl": 0.33, "iterations": 80,
                "heldout": {"arithmetic_accuracy": 0.6062, "arithmetic_accuracy_greedy": 0.875},
                "final_model": "/r/ppo/final", "timings": {"wall_time": 10.8}},
    }
    table = console.summary_table(summary, "/r")
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["step", "time", "steps", "final"]
    assert "arithmetic_accuracy / arithmetic_accuracy_greedy" in lines[0]
    sft, reward, ppo = (next(line for line in lines if line.startswith(s))
                        for s in ("sft ", "reward ", "ppo "))
    assert "18s" in sft and "1350" in sft and "loss 0.487" in sft and "0.441 / 0.713" in sft
    assert "accuracy 0.990" in reward
    assert "0.441 / 0.713 -> 0.606 / 0.875" in ppo and "reward 3.140" in ppo
    assert any(line.startswith("outputs: /r") for line in lines)
    assert "  ppo model: /r/ppo/final" in lines


def test_summary_table_of_a_single_step_without_heldout():
    table = console.summary_table({"reward": {"eval_accuracy": 0.5, "steps": 3}}, "/x")
    assert table.splitlines()[2].split()[:3] == ["reward", "-", "3"]
    assert "held-out" in table.splitlines()[0]
