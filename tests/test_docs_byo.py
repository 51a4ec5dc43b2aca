"""docs/byo.md ("Bring your own model and data") runs as written.

The page's ```bash and ```python blocks are run in order in an empty directory (bash with
`-e -o pipefail`, `rlhf` and `python` from this interpreter's environment, no hub access);
each must exit 0. Comments on the page tell this test the rest:

    <!-- byo-test: file NAME -->           the next code block is a file to write, NAME
    <!-- byo-test: expect PATH ... -->     after the block above it, these paths exist
    <!-- byo-test: fast subset ends -->    the SFT-only test (slow, 40 s) stops here; the page,
                                           JAX and eval/chat/export included, is `-m slow`
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "byo.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MARK = re.compile(r"^<!-- byo-test: (.*?) -->\n", re.M)


@dataclass
class Block:
    lang: str
    code: str
    file: str | None = None
    expect: list[str] = field(default_factory=list)
    fast: bool = True


def blocks(text: str) -> list[Block]:
    """The page's runnable blocks (bash, python, and those named as files), in order."""
    out: list[Block] = []
    pending_file, fast = None, True
    events = sorted([(m.start(), "mark", m) for m in MARK.finditer(text)]
                    + [(m.start(), "fence", m) for m in FENCE.finditer(text)],
                    key=lambda e: e[0])
    for _, kind, m in events:
        if kind == "fence":
            lang, code = m.group(1), m.group(2)
            if pending_file or lang in ("bash", "python"):
                out.append(Block(lang, code, pending_file, fast=fast))
            pending_file = None
            continue
        what = m.group(1).split()
        if what[0] == "file":
            pending_file = what[1]
        elif what[0] == "expect":
            out[-1].expect += what[1:]
        elif what[:3] == ["fast", "subset", "ends"]:
            fast = False
        else:
            raise AssertionError(f"unknown byo-test mark {m.group(0)!r}")
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a parent's distributed world is not this one's
    return env


def run_page(directory: Path, *, fast_only: bool) -> list[Block]:
    ran = []
    for block in blocks(PAGE.read_text()):
        if fast_only and not block.fast:
            break
        if block.file:
            (directory / block.file).write_text(block.code)
        else:
            command = ([sys.executable, "-c", block.code] if block.lang == "python"
                       else ["bash", "-e", "-o", "pipefail", "-c", block.code])
            proc = subprocess.run(command, cwd=directory, env=_env(), capture_output=True,
                                  text=True, timeout=900, check=False)
            assert proc.returncode == 0, (
                f"docs/byo.md block failed ({proc.returncode}):\n{block.code}\n"
                f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
        missing = [p for p in block.expect if not (directory / p).exists()]
        assert not missing, f"after\n{block.code}\nthe page says these exist: {missing}"
        ran.append(block)
    return ran


def test_the_page_is_marked_up():
    page = blocks(PAGE.read_text())
    assert [b.lang for b in page if b.fast][:2] == ["python", "python"]
    assert any(b.file == "byo.yaml" for b in page)
    fast_commands = " ".join(b.code for b in page if b.fast and b.lang == "bash")
    assert "rlhf sft" in fast_commands
    slow = " ".join(b.code for b in page if not b.fast)
    for command in ("rlhf rm", "rlhf ppo", "--backend jax", "rlhf eval", "rlhf chat",
                    "rlhf export"):
        assert command in slow
    assert "docs/byo.md" in (REPO / "README.md").read_text()


@pytest.mark.slow  # 40 s on 2 cores; test_the_page_is_marked_up stays in the default suite
def test_byo_page_sft_on_torch(tmp_path):
    """Data, model, config and the torch SFT step, as the page writes them."""
    ran = run_page(tmp_path, fast_only=True)
    assert "rlhf sft" in ran[-1].code
    assert (tmp_path / "runs" / "byo" / "sft" / "final" / "config.json").is_file()


@pytest.mark.slow
def test_byo_page_whole(tmp_path):
    """Every step on torch, the pipeline on JAX, eval, chat and export."""
    ran = run_page(tmp_path, fast_only=False)
    assert "rlhf export" in ran[-1].code
