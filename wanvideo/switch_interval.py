"""Python's GIL switch interval, shortened while background threads run Python beside the model's launches.

Many torch ops release the GIL while they run (kernel launches, host-to-device copies, file reads), and a thread that
wants it back while another thread computes in Python waits for that thread's switch interval: 5 ms by default, per
op. Our background threads (a compile, the compiler's and the attention kernel's imports during a load) are such
Python work, beside a thread whose every op waits that way.
"""

from __future__ import annotations

import sys
import threading


class ShortSwitchInterval:
    """Python's GIL switch interval, shortened while one or more background threads run (each enters it), restored
    after the last.

    The eager blocks beside a compile took 3-4x their time (1.3B 480p forwards of 3.3-4.0 s instead of 1.1 s,
    H200); on the CPU, 120 small ops followed by a 20 ms wait (a block's launches, then the pacer's) launch in 338 ms
    beside a busy thread at 5 ms, 6 ms at 0.2 ms, while the busy thread keeps 96% of its pace (``INTERVAL``)."""

    INTERVAL = 2e-4

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._saved = sys.getswitchinterval()

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, self.INTERVAL))
            self._active += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                sys.setswitchinterval(self._saved)


LAUNCHES_FIRST = ShortSwitchInterval()
"""The process's one: the switch interval is process-wide."""
