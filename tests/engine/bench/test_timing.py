"""How one call is timed."""
from hcd.engine.bench.timing import try_cuda


def test_try_cuda_reports_the_first_cause_in_one_line():
    def capture():
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    assert try_cuda(lambda: 1.5) == (1.5, None)
    value, reason = try_cuda(capture)
    assert value is None and reason == "RuntimeError: operation not permitted when stream is capturing"
