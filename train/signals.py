"""SIGUSR1/SIGTERM -> "checkpoint at the next step boundary, then exit with EXIT_REQUEUE".

The handler only sets a flag: saving inside a signal handler can deadlock (a collective or a lock may be held
at the moment the signal arrives). The loop reduces the flag across ranks so all stop at the same step.
"""

import signal

_requested = {"signal": None}


def _handler(signum, frame):
    _requested["signal"] = signum


def install_stop_handlers() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def stop_requested() -> bool:
    return _requested["signal"] is not None


def requested_signal_name() -> str | None:
    sig = _requested["signal"]
    return signal.Signals(sig).name if sig is not None else None
