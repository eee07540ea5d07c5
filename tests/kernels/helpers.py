"""Shared float64 comparison for the kernel tests (and the benchmarks, which import the references here).

The machinery lives in hcd.kernels.testing so that `hcd verify` (which may not import tests) applies the
same inputs and the same tolerance rule; this module re-exports it with a pytest-friendly assertion.
"""
from hcd.kernels.testing import (MARGIN, Case, as_float64, check_head, check_student, compare, failures,  # noqa: F401
                             format_rows, make_inputs, run_head, run_student)
from hcd.kernels.reference import hcd_head_loss_eager, student_loss_eager  # noqa: F401  (the references)


def assert_rows_ok(rows, what=""):
    """Fail with the whole table when any output breaks the tolerance rule."""
    bad = failures(rows)
    assert not bad, f"{what}: {', '.join(r.output for r in bad)} outside tolerance\n{format_rows(rows)}"
