"""SIGTERM and SIGHUP end a merge the way Ctrl-C does: the exception unwinds, every staging and scratch
directory is removed on the way out, and the CLI prints one line.

``kill``, ``timeout``, a closed terminal and job schedulers send these; Python's default for them is to die on
the spot, leaving half-written files behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, _frame):
    for s in SIGNALS:  # one is enough: a second signal must not interrupt the clean-up
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM/SIGHUP raise ``Terminated`` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interrupted_line(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The one line and the exit code for an interrupt."""
    if isinstance(exc, Terminated):
        return f"terminated by {signal.Signals(exc.signum).name}; nothing was written", exc.exit_code
    return "interrupted; nothing was written", 130
