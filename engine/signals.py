"""Ctrl-C / SIGTERM during training: a flag the loop reads at its next optimizer step, so the run stops there
with a checkpoint (a job scheduler's pre-emption). A second Ctrl-C interrupts at once."""
import signal
import threading

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self):
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, group) -> bool:
        """Whether any rank got a stop signal (all stop at the same step); with one process (group None)
        its own flag. The flag is a host tensor all-reduced in a gloo group: no wait for the device."""
        if group is None:
            return self.signum is not None
        flag = torch.tensor([int(self.signum is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag[0])

    @property
    def name(self) -> str:
        return signal.Signals(int(self.signum or signal.SIGTERM)).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
