"""Preemption: Slurm's warning signal (SIGUSR1, `--signal=USR1@N`) or SIGTERM (preemption, scancel,
a requeue) becomes a flag the training loop polls; the loop checkpoints at the next step boundary
(cutting a running validation short) and exits with PREEMPTED_EXIT. Torch-free: the launcher reads
the exit code from here.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "checkpointed, run me again" (the launcher requeues under Slurm, records the stop locally)
PREEMPTED_EXIT = 75


class PreemptionHandler:
    """Context manager: while active, SIGUSR1 and SIGTERM set `.requested` (the signal number)
    instead of killing the process; the loop checks it between steps (and between validation
    micro-batches), checkpoints and exits (`raise SystemExit(75)`). Previous handlers come back on
    exit. Outside the main thread (signals cannot be caught there) it does nothing."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)
    EXIT_CODE = PREEMPTED_EXIT

    def __init__(self, signals=None):
        self.signals = tuple(signals) if signals is not None else self.SIGNALS
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is None:
            log.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False
