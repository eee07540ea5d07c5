"""bench/tile_sweep.py's table and its refusal without CUDA (it times with hcd.engine.bench.timing)."""
from bench.tile_sweep import format_rows, main


def test_tile_sweep_marks_default_fastest_and_mismatches():
    rows = [{"dtype": "bfloat16", "launch": "z_gemm", "candidate": "default", "us": 20.0, "tflops": 150.0,
             "matches_default": True, "error": None},
            {"dtype": "bfloat16", "launch": "z_gemm", "candidate": [128, 128, 64, 8, 3], "us": 15.0, "tflops": 200.0,
             "matches_default": False, "error": None},
            {"dtype": "bfloat16", "launch": "z_gemm", "candidate": [64, 256, 64, 8, 3], "us": None, "tflops": None,
             "matches_default": None, "error": "OutOfResources: shared memory"}]
    lines = format_rows(rows).splitlines()
    assert lines[1].rstrip().endswith("*")
    assert "<" in lines[2] and "output differs from the default's" in lines[2]
    assert "OutOfResources: shared memory" in lines[3] and " - " in lines[3]
    assert main([]) == 2  # no CUDA here: a clear refusal, not interpreter timings
