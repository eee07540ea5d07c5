"""Test-wide setup. The Triton interpreter must be chosen before triton is imported anywhere: on machines
without CUDA the kernels run under TRITON_INTERPRET=1; on a GPU machine they run for real."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
