"""Bounded shutdown: SIGTERM ends a process within ``EXIT_GRACE_S`` whatever it is running.

A graceful stop waits for work in progress (a stage's llama_decode, the API's requests, a
tokenizer call in a worker thread that the interpreter joins at exit); past the grace period
the process exits anyway, so a supervisor's SIGTERM is never ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

EXIT_GRACE_S = 8.0  # within the 10 s a supervisor usually allows before SIGKILL


def exit_after(grace_s: float = EXIT_GRACE_S, status: int = 0) -> None:
    """Make sure this process has exited ``grace_s`` from now (idempotent)."""
    global _armed
    with _lock:
        if _armed:
            return
        _armed = True
    timer = threading.Timer(grace_s, os._exit, (status,))
    timer.daemon = True
    timer.start()


def take_sigterm(stop: list[Callable[[], object]]) -> None:
    """Answer SIGTERM on a thread of its own, whatever the main thread is doing: call the
    functions in ``stop`` (a list the caller may fill later) and exit within the grace period;
    with nothing to stop yet (still starting), exit at once. SIGTERM must be blocked before
    any other thread starts (numpy's, llama.cpp's, ZeroMQ's: they inherit the mask), so that
    only this thread receives it; blocking it here covers the threads started after."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        signal.sigwait({signal.SIGTERM})
        for action in list(stop):
            action()
        exit_after(EXIT_GRACE_S if stop else 0.0)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


_lock = threading.Lock()
_armed = False
