"""One writer per run directory: a second run fails at once naming the owner's pid and host,
a lock left by a dead process is taken over with a warning, and the pipeline holds the lock
from start to end (re-entrantly) on the main process."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runlock import (
    LOCK_FILE,
    RunDirLock,
    RunDirLockedError,
    check_run_dir_free,
    hold_run_dir,
    lock_owner,
)

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys
from shared.runlock import RunDirLock
lock = RunDirLock(sys.argv[1], command="rlhf pipeline (the other run)").acquire()
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
lock.release()
"""


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_a_second_run_fails_at_once_naming_the_owner(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError) as err:
            RunDirLock(tmp_path).acquire()
        message = str(err.value)
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in message
        assert "rlhf pipeline (the other run)" in message and "another --run-dir" in message
        with pytest.raises(RunDirLockedError):
            check_run_dir_free(tmp_path)
    finally:
        holder.communicate("", timeout=30)
    assert lock_owner(tmp_path) is None  # released: the record is cleared
    RunDirLock(tmp_path).acquire().release()


def test_a_killed_owner_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    record = {"pid": dead, "host": socket.gethostname(), "started": "2020-01-01T00:00:00",
              "command": "rlhf sft"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="shared.runlock"):
        lock = RunDirLock(tmp_path, command="rlhf sft --resume").acquire()
    assert f"taking over the stale lock of pid {dead}" in caplog.text
    assert lock_owner(tmp_path)["pid"] == os.getpid()
    assert lock_owner(tmp_path)["command"] == "rlhf sft --resume"
    lock.release()
    assert lock_owner(tmp_path) is None


def test_a_lock_of_another_host_is_not_guessed_at(tmp_path):
    record = {"pid": 4242, "host": "some-other-node", "started": "2020-01-01T00:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(RunDirLockedError, match=r"pid 4242 on host some-other-node.*delete "
                                                r".*\.lock"):
        RunDirLock(tmp_path).acquire()


def test_the_same_process_cannot_open_two_writers(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()


def test_hold_is_reentrant_and_main_process_only(tmp_path):
    with hold_run_dir(tmp_path / "run") as outer:
        with hold_run_dir(tmp_path / "run") as inner:
            assert inner is outer and outer.held
        assert outer.held  # the inner block does not release the outer one
        check_run_dir_free(tmp_path / "run")  # this process's own lock is no obstacle
    assert not outer.held and lock_owner(tmp_path / "run") is None
    with hold_run_dir(tmp_path / "other", is_main=False) as nothing:
        assert nothing is None and not (tmp_path / "other").exists()


def test_the_pipeline_holds_the_lock_while_it_runs(tmp_path):
    from shared.config import config_from_dict
    from shared.pipeline import Backend, Session, run_pipeline
    from shared.runlog import RunLogger

    seen = []

    class Trainer:
        def __init__(self, config, *, run_dir, **kwargs):
            self.run_dir = run_dir

        def run(self, *, resume=False):
            seen.append(lock_owner(self.run_dir))
            with pytest.raises(RunDirLockedError):  # a second writer right now
                RunDirLock(self.run_dir).acquire()
            return {"steps": 1}

    class Fake(Backend):
        def trainer(self, step):
            return Trainer

        def open_session(self, config, run_dir):
            return Session(RunLogger(run_dir, enable_tensorboard=False))

    config = config_from_dict({"model": {"actor_model_name_or_path": "x"},
                               "pipeline_steps": ["sft", "reward"]})
    run_pipeline(Fake("fake", {}, session=""), config, tmp_path)
    assert [owner["pid"] for owner in seen] == [os.getpid()] * 2
    assert lock_owner(tmp_path) is None
