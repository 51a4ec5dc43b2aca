"""Generated sections of docs/performance.md: the text between a pair of HTML-comment markers.

``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``: ``bench.run`` writes the ``bench`` section
(the latest full run's results) and ``bench.cost_curves`` the ``cost-curves`` one. Everything
outside the markers, the markers included, is kept byte for byte.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DOCS", "MarkerError", "markers", "replace_section"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


class MarkerError(ValueError):
    """The file lacks a section's markers (or has them twice, or out of order)."""


def markers(name: str) -> tuple[str, str]:
    """The start and end marker lines of section ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path: Path, name: str, body: str) -> None:
    """Replaces the text between section ``name``'s markers in ``path`` with ``body``: a newline
    after the start marker, a blank line before the end one (so a table or list that ends
    ``body`` ends there). The rest of the file is left byte for byte."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:  # no newline translation
        text = f.read()
    start, end = markers(name)
    missing = [m for m in (start, end) if m not in text]
    if missing:
        raise MarkerError(f"{path}: no {' and no '.join(missing)} marker line: the '{name}' "
                          f"section to write must sit between {start} and {end}")
    repeated = [m for m in (start, end) if text.count(m) > 1]
    if repeated:
        raise MarkerError(f"{path}: {', '.join(repeated)} appears more than once")
    head, rest = text.split(start, 1)
    if end not in rest:
        raise MarkerError(f"{path}: {end} comes before {start}")
    _, tail = rest.split(end, 1)
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(f"{head}{start}\n{body.strip(chr(10))}\n\n{end}{tail}")
