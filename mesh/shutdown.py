"""Bounded shutdown: SIGTERM ends a process within ``EXIT_GRACE_S`` whatever it is running.

A graceful stop waits for work in progress (a stage's llama_decode, the API's requests, a
tokenizer call in a worker thread that the interpreter joins at exit); past the grace period
the process exits anyway, so a supervisor's SIGTERM is never ignored.

A process started by another (``mesh up``'s stages) also stops when its parent dies, however
it died (SIGKILL, a crash): the parent holds the write end of a pipe whose read end the child
inherits (``LIFELINE_ENV`` names it), and the child's read returns at end of file once no
process holds the write end.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

EXIT_GRACE_S = 8.0  # within the 10 s a supervisor usually allows before SIGKILL
LIFELINE_ENV = "MESH_LIFELINE_FD"  # the inherited read end of the parent's lifeline pipe


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
        _stop(stop)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


def take_lifeline(stop: list[Callable[[], object]]) -> None:
    """Stop as on SIGTERM once the parent that passed a lifeline (``LIFELINE_ENV``) is gone;
    a process started without one (by hand, by a supervisor) is left alone."""
    value = os.environ.pop(LIFELINE_ENV, None)
    if value is None or not value.isdigit():
        return
    fd = int(value)

    def wait() -> None:
        try:
            while os.read(fd, 1):  # the parent never writes: only end of file returns
                pass
        except OSError:
            pass
        _stop(stop)

    threading.Thread(target=wait, name="lifeline", daemon=True).start()


def _stop(stop: list[Callable[[], object]]) -> None:
    for action in list(stop):
        action()
    exit_after(EXIT_GRACE_S if stop else 0.0)


_lock = threading.Lock()
_armed = False
