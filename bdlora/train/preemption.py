"""Stop on request: SIGTERM or SIGUSR1 end the run after the current step, with a checkpoint.

Cluster schedulers announce preemption and time limits with a signal (Slurm: ``--signal``, then
SIGTERM; torchrun forwards its SIGTERM to every worker). A signal arrives at each rank at a different
point of a step, so the ranks agree on when to stop: after every step one all-reduce (MAX, over the
whole job) of a one-element flag. Every rank then saves the same step's checkpoint and stops, and
``checkpoint.resume=auto`` continues the run exactly. Repeated signals change nothing (torchrun and
Slurm may deliver the same request twice); SIGINT (Ctrl-C) still interrupts at once.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from bdlora.parallel.comm import max_over

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """The run stopped after ``step`` because of ``signum``, with a checkpoint at ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
            f"(continue the run with checkpoint.resume=auto)"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by this signal"


class StopRequests:
    """While active (``with``), SIGTERM / SIGUSR1 only record a request; ``agreed`` reads it job-wide."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers live on the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> int:
        """The signal some rank received (0: none), the same on every rank; call it on all of them."""
        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)
        return int(max_over(flag, dist.group.WORLD).item())
