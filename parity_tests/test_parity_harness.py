"""The harness itself: the comparison criterion, gradient rows, the tolerance registry and the
table, on hand-made arrays (no models)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from parity_tests.harness import Row, assert_passed, compare, compare_grads, format_table
from parity_tests.tolerances import TOLERANCES, Tolerance, render_table, tolerance

DOCS = Path(__file__).resolve().parent.parent / "docs" / "parity.md"


def test_criterion_is_normwise():
    ref = np.array([10.0, 1e-9, -3.0])
    # 1e-4 off on the O(10) entry: allowed 1e-5 + 1e-5 * 10 = 1.1e-4.
    row = compare("2", "x", ref + [1e-4, 0, 0], ref, "logits")
    assert row.passed and row.max_abs_diff == pytest.approx(1e-4)
    assert row.max_rel_diff == pytest.approx(1e-5)
    # The near-zero entry would have a huge element-wise relative error; norm-wise it is fine.
    assert compare("2", "x", ref + [0, 5e-6, 0], ref, "logits").passed
    assert not compare("2", "x", ref + [2e-4, 0, 0], ref, "logits").passed


def test_mask_selects_entries_and_broadcasts_over_trailing_axes():
    ref = np.zeros((2, 3, 4))
    actual = ref.copy()
    actual[1, 2] = 7.0  # garbage at a padding position
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    assert compare("2", "logits", actual, ref, "logits", mask=mask).passed
    assert not compare("2", "logits", actual, ref, "logits").passed


def test_infinities_nans_and_shapes():
    ninf = -np.inf
    assert compare("1", "filtered", np.array([ninf, 1.0]), np.array([ninf, 1.0]), "exact").passed
    assert not compare("1", "x", np.array([ninf, 1.0]), np.array([0.0, 1.0]), "exact").passed
    assert not compare("1", "x", np.array([np.nan]), np.array([np.nan]), "shared_fp32").passed
    row = compare("1", "x", np.zeros(3), np.zeros(4), "exact")
    assert not row.passed and "shape" in row.note


def test_grad_rows_need_the_same_names_and_check_each_tensor():
    ref = {"a.weight": np.full((2, 2), 10.0), "b.bias": np.full(3, 1e-3)}
    ok = compare_grads("3", "g", {k: v + 1e-7 for k, v in ref.items()}, ref)
    assert ok.passed and "2 tensors" in ok.note
    # 1e-5 is far inside the large tensor's budget but outside the small tensor's.
    bad = compare_grads("3", "g", {k: v + 1e-5 for k, v in ref.items()}, ref)
    assert not bad.passed and "failing: b.bias" in bad.note
    missing = compare_grads("3", "g", {"a.weight": ref["a.weight"]}, ref)
    assert not missing.passed and "b.bias" in missing.note


def test_every_tolerance_has_a_reason_and_names_are_checked():
    for name, (atol, rtol, reason) in TOLERANCES.items():
        assert atol >= 0 and rtol >= 0 and len(reason) > 40, name
    assert tolerance("grad") == Tolerance("grad", *TOLERANCES["grad"])
    with pytest.raises(KeyError, match="known"):
        tolerance("loose")


def test_docs_show_the_current_tolerances():
    text = DOCS.read_text()
    block = re.search(r"<!-- tolerances: .*? -->\n(.*?)\n<!-- end tolerances -->", text, re.S)
    assert block, "docs/parity.md lacks the generated tolerances table"
    assert block.group(1).strip() == render_table(), (
        "docs/parity.md is stale: paste parity_tests.tolerances.render_table()")


def test_table_and_assert_passed():
    rows = [compare("2", "logits [right]", np.ones(2), np.ones(2), "logits"),
            Row("3", "sft grad", 1.0, 1.0, tolerance("grad"), False, "21 tensors; worst w")]
    table = format_table(rows)
    assert table.splitlines()[0].split() == [
        "level", "quantity", "max", "abs", "diff", "max", "rel", "diff", "tolerance", "result"]
    assert "FAIL  (21 tensors; worst w)" in table and "1/2 passed, 1 FAILED" in table
    with pytest.raises(AssertionError, match="sft grad"):
        assert_passed(rows)
    with pytest.raises(AssertionError, match="nothing"):
        assert_passed([])
