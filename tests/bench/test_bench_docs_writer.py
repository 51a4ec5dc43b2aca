"""docs/performance.md's generated sections (``bench.docs_writer``) and when ``bench.run`` writes
them. Every write here goes to a copy in tmp_path: no test touches the real page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import cost_curves
from bench import run as bench_run
from bench.docs_writer import DOCS, MarkerError, markers, replace_section

PAGE = """# Page

Before, with a tab\t and CRLF\r
<!-- bench:start -->
old results
| a | b |
<!-- bench:end -->

Between.
<!-- cost-curves:start -->
old curves
<!-- cost-curves:end -->
After, no final newline"""


def _page(tmp_path: Path, text: str = PAGE) -> Path:
    path = tmp_path / "performance.md"
    path.write_bytes(text.encode())
    return path


def test_replaces_only_between_its_markers(tmp_path):
    path = _page(tmp_path)
    replace_section(path, "bench", "## Latest run\n\n| x |\n| --- |\n| 1 |\n")
    text = path.read_bytes().decode()
    start, end = markers("bench")
    head, rest = PAGE.split(start, 1)
    tail = rest.split(end, 1)[1]
    assert text == f"{head}{start}\n## Latest run\n\n| x |\n| --- |\n| 1 |\n\n{end}{tail}"
    assert "old curves" in text and "old results" not in text


def test_rewriting_is_idempotent_and_sections_are_independent(tmp_path):
    path = _page(tmp_path)
    replace_section(path, "bench", "first")
    replace_section(path, "cost-curves", "curves")
    once = path.read_bytes()
    replace_section(path, "bench", "first")
    assert path.read_bytes() == once
    assert once.decode().endswith("<!-- cost-curves:start -->\ncurves\n\n"
                                  "<!-- cost-curves:end -->\nAfter, no final newline")


@pytest.mark.parametrize("text, message", [
    (PAGE.replace("<!-- bench:end -->", ""), "no <!-- bench:end --> marker"),
    (PAGE.replace("<!-- bench:start -->", "").replace("<!-- bench:end -->", ""),
     "no <!-- bench:start --> and no <!-- bench:end --> marker"),
    (PAGE + "\n<!-- bench:start -->\n", "appears more than once"),
    (PAGE.replace("<!-- bench:start -->", "X").replace("<!-- bench:end -->",
                                                       "<!-- bench:start -->").replace(
        "X", "<!-- bench:end -->"), "comes before"),
])
def test_an_error_names_the_file_and_the_markers(tmp_path, text, message):
    path = _page(tmp_path, text)
    with pytest.raises(MarkerError, match=message) as info:
        replace_section(path, "bench", "new")
    assert str(path) in str(info.value)
    assert path.read_bytes() == text.encode()  # nothing written


def test_the_real_page_has_both_sections():
    text = DOCS.read_text()
    for name in ("bench", "cost-curves"):
        start, end = markers(name)
        assert text.count(start) == text.count(end) == 1
        assert text.index(start) < text.index(end)


def test_cost_curves_write_through_the_same_helper(tmp_path):
    path = _page(tmp_path)
    cost_curves.write_docs("| curve |", path)
    assert "<!-- cost-curves:start -->\n| curve |\n\n<!-- cost-curves:end -->" in \
        path.read_text()


@pytest.mark.parametrize("argv, expected", [
    ([], True),
    (["--out", "elsewhere", "--model-cache", "models", "--timeout", "60"], True),
    (["--quick"], False),
    (["--only", "generation/*"], False),
    (["--sizes", "tiny"], False),
    (["--backend", "torch"], False),
    (["--in-process"], False),
    (["--gpu-recipe"], False),
    (["--repeats", "1"], False),
    (["--profile"], False),
    (["--quick", "--write-docs"], True),
    (["--no-write-docs"], False),
])
def test_only_a_full_default_run_writes_docs_unless_told(argv, expected):
    options = bench_run._options(bench_run.build_parser().parse_args(argv))  # noqa: SLF001
    assert bench_run.writes_docs(options) is expected


def test_rlhf_bench_namespace_honours_write_docs():
    """`rlhf bench`'s namespace carries out/quick/backend only: the default rule applies, and
    a ``write_docs`` attribute, when present, decides."""
    plain = bench_run._options(argparse.Namespace(out=None, quick=False, backend=None))  # noqa: SLF001
    assert bench_run.writes_docs(plain) is True
    told = bench_run._options(argparse.Namespace(out=None, quick=False, backend=None,  # noqa: SLF001
                                                 write_docs=False))
    assert bench_run.writes_docs(told) is False


def _fake_run(monkeypatch, out: Path, *, stop_at: str | None = None):
    """Fake measurements (no model runs) for ``--only 'sft/micro/*'``."""
    probe = {"fp32_peak_flops": 1e10, "torch_fp32_flops": 1e10, "jax_fp32_flops": None,
             "torch_bf16_flops": None, "memory_bandwidth_bytes": 1e9, "bf16_native": False}
    timing = {"median_s": 0.5, "min_s": 0.5, "times_s": [0.5]}
    sft = {"framework": timing, "plain": {"median_s": 0.4, "times_s": [0.4]},
           "peak_rss_bytes": 2**20}

    def fake(task, directory, timeout):
        if task["id"] == stop_at:
            raise KeyboardInterrupt
        result = probe if task["kind"] == "machine" else sft if task["kind"] == "sft" else {}
        return {"ok": True, "result": result, "error": None, "wall_s": 0.1,
                "load_average": None}

    monkeypatch.setattr(bench_run, "_run_subprocess", fake)


def _args(out: Path, docs: Path, **extra) -> argparse.Namespace:
    return argparse.Namespace(out=out, backend=None, sizes="micro", only=["sft/micro/*"],
                              docs=docs, **extra)


def test_a_finished_run_told_to_writes_its_section(tmp_path, monkeypatch):
    out, docs = tmp_path / "out", _page(tmp_path)
    _fake_run(monkeypatch, out)
    assert bench_run.main(None, _args(out, docs, write_docs=True)) == 0
    text = docs.read_bytes().decode()
    doc = json.loads((out / "results.json").read_text())
    section = text.split("<!-- bench:start -->\n", 1)[1].split("<!-- bench:end -->", 1)[0]
    assert section.startswith(f"## Latest run: benchmark results ({doc['created']})")
    assert "### Training steps" in section and "| micro | torch | SFT step |" in section
    assert f"`{doc['command']}`" in section
    assert text.startswith(PAGE.split("<!-- bench:start -->")[0])
    assert text.endswith(PAGE.split("<!-- bench:end -->")[1])


def test_a_partial_run_or_one_not_told_leaves_docs_alone(tmp_path, monkeypatch):
    out, docs = tmp_path / "out", _page(tmp_path)
    _fake_run(monkeypatch, out)
    assert bench_run.main(None, _args(out, docs)) == 0  # --only: off by default
    assert docs.read_bytes() == PAGE.encode()
    _fake_run(monkeypatch, out, stop_at="sft/micro/jax")
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(None, _args(out, docs, write_docs=True))
    assert json.loads((out / "results.json").read_text())["partial"] is True
    assert docs.read_bytes() == PAGE.encode()
