"""`hcd bench`: the plan (shapes.py, plan.py), how one call is timed (timing.py), the rows it measures
(kernel_rows.py with roofline.py, profile.py; step_rows.py with step_build.py and breakdown.py; loader_rows.py),
the tables (report.py) and the run that ties them together (run.py)."""
from hcd.engine.bench.report import run_report
from hcd.engine.bench.run import run_bench

__all__ = ["run_bench", "run_report"]
