"""Benchmarks are run explicitly (`python -m pytest bench/ --benchmark-only`), never by the test command."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
