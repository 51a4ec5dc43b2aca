"""The checkpoint, export and held-out half of the numpy "backends" the loop tests train
(`test_supervised_loop`, `test_dpo_step`): weights ``self.w`` saved, restored and exported as
``.npy`` files, optionally in the background (``saves_in_background``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class NumpyWeights:
    """Mixin: a subclass sets ``self.w`` (and may set ``saves_in_background``)."""

    saves_in_background = False
    unsaved: tuple[Path, np.ndarray, dict] | None = None
    waits = 0

    @staticmethod
    def _write(path: Path, w: np.ndarray, state: dict) -> None:
        path.mkdir(parents=True)
        np.save(path / "w.npy", w)
        (path / "loop.json").write_text(json.dumps(state))

    def save(self, path, loop_state):
        if self.saves_in_background:
            self.unsaved = (path, self.w.copy(), loop_state)
        else:
            self._write(path, self.w, loop_state)

    def wait_until_saved(self):
        self.waits += 1
        if self.unsaved is not None:
            self._write(*self.unsaved)
            self.unsaved = None

    def restore(self, path):
        self.w = np.load(path / "w.npy")
        return json.loads((path / "loop.json").read_text())

    def export(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "w.npy", self.w)
        (directory / "config.json").write_text("{}")
        (directory / "tokenizer_config.json").write_text("{}")

    def heldout_metrics(self):
        return {"arithmetic_accuracy": float(self.w[1])}
