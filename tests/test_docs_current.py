"""The docs say what the code does: every import in a ```python block resolves, no page says
`rlhf parity` / `rlhf bench` raise NotImplementedError, and the backends' CLIs turn those two
commands away with the place that does run them (shared.cli runs both itself)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md"])


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)


def _imports(code: str) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every import in ``code`` (name None for ``import module``)."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_import_in_the_python_blocks_resolves(page):
    missing = []
    for code in _python_blocks(page):
        for module, name in _imports(code):
            try:
                found = importlib.import_module(module)
            except ImportError as err:
                missing.append(f"{module}: {err}")
                continue
            if name is not None and not hasattr(found, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{module}.{name}")
    assert not missing, f"{page.name}: {missing}"


def test_no_page_says_parity_or_bench_are_not_implemented():
    for page in PAGES:
        text = " ".join(page.read_text().split())
        for sentence in re.split(r"(?<=[.;])\s", text):
            if "NotImplementedError" in sentence:
                assert "rlhf parity" not in sentence and "rlhf bench" not in sentence, (
                    f"{page.name}: {sentence}")


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("command, entry", [("parity", "parity_tests.run.main"),
                                            ("bench", "bench.run.main")])
def test_backend_clis_point_parity_and_bench_to_shared_cli(backend, command, entry):
    from shared import cli

    assert f"{cli._BOTH_BACKENDS[command]}.main" == entry  # what shared.cli runs instead
    run = importlib.import_module(f"{backend}_rlhf.cli").run
    with pytest.raises(ValueError, match=rf"compares or measures both backends.*{entry}") as err:
        run(command, None, None)
    assert "issue" not in str(err.value)
