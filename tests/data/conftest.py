"""Fixtures for the data-layer tests: fresh tokenizers and file writers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from data_helpers import make_char_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing in these tests may reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tokenizer():
    """A fresh character tokenizer with <pad> and </s> (tests may mutate it)."""
    return make_char_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., str]:
    """write_jsonl(name, rows) -> path; rows are dicts (dumped) or raw strings (as is)."""

    def write(name: str, rows: Iterable[object]) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def write_text(tmp_path: Path) -> Callable[[str, str], str]:
    """write_text(name, content) -> path."""

    def write(name: str, content: str) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        return str(path)

    return write
