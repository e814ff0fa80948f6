"""Child processes that do not outlive their parent (Linux: PR_SET_PDEATHSIG).

Shared by the embedded nats-server processes (SIGKILL: nothing to save) and the
supervisor's workers (SIGTERM: a graceful drain).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send ``sig`` to the child when its parent dies.

    That covers the paths no ``finally`` reaches (a SIGKILLed parent, a crashed test worker).
    PDEATHSIG fires when the *thread* that forked exits, so a child started from another
    thread would die with that thread: there, and off Linux, None (rely on stop/atexit).
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    number = int(sig)

    def preexec() -> None:
        # Resolved above, in the parent: between fork and exec the child only makes the call.
        prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), number)

    return preexec
