"""Level 1: every public `shared` function gives the same numbers on numpy, torch and jitted JAX,
on right- and left-padded masks (table in `parity_tests.shared_cases`)."""

from __future__ import annotations

import pytest

from parity_tests.batches import PADDINGS
from parity_tests.harness import assert_passed
from parity_tests.shared_cases import CASES, EXEMPT, case_rows, covered_names, public_names


def test_table_covers_every_public_function():
    public = public_names()
    missing = public - covered_names() - set(EXEMPT)
    assert not missing, f"public `shared` names without a level-1 row or exemption: {missing}"
    stale = (covered_names() | set(EXEMPT)) - public
    assert not stale, f"level-1 rows or exemptions for names `shared` no longer exports: {stale}"
    assert not covered_names() & set(EXEMPT), "a name is both covered and exempt"


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_shared_function(case, padding):
    assert_passed(case_rows(case, padding))
