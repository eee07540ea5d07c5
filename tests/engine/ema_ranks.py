"""A torchrun entry for test_ema.py: `hcd train` whose checkpoint saves also write every rank's EMA state to
$HCD_TEST_EMA_DUMP/rank{r}-step{n}.pt (a checkpoint holds rank 0's), so a test can compare the ranks' EMAs."""
import os
import sys
from pathlib import Path

import torch

from hcd.engine import checkpoint
from hcd.engine.cli import main

_save = checkpoint.save


def save(engine, ckpt_dir, step, client_state, rank, **kw):
    if kw.get("ema") is not None:
        torch.save(kw["ema"]["module"], Path(os.environ["HCD_TEST_EMA_DUMP"]) / f"rank{rank}-step{step}.pt")
    return _save(engine, ckpt_dir, step, client_state, rank, **kw)


checkpoint.save = save  # Checkpointer.save calls the module's save at call time

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
