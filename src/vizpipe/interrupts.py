"""Handle Ctrl-C and SIGTERM for the command line by raising KeyboardInterrupt and recording the signal.

Python runs a signal handler in the main thread at the next bytecode it
executes. When that bytecode belongs to a finalizer (a ``__del__`` method or
a weakref callback), the KeyboardInterrupt the handler raises is printed as
"Exception ignored" and dropped, so the job would go on. The handler
therefore also records the signal, and the runner calls
``raise_if_requested`` after every landscape point.

NOTE: training, Hessian and activation-maximization loops do not check the
record yet, so a signal dropped there stops the job only at the next
landscape point, if any.
"""

from __future__ import annotations

import signal

_requested: int | None = None


def handle(signum: int, frame) -> None:
    """Record the signal and raise KeyboardInterrupt (a handler for ``signal.signal``)."""
    global _requested
    _requested = signum
    raise KeyboardInterrupt(f"signal {signum}")


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt if a signal arrived since ``install``, even one that a finalizer dropped."""
    if _requested is not None:
        raise KeyboardInterrupt(f"signal {_requested}")


def install() -> dict[int, object]:
    """Route SIGINT and SIGTERM to ``handle``, clear the record and return the previous handlers."""
    global _requested
    _requested = None
    return {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers that ``install`` returned."""
    for number, handler in previous.items():
        signal.signal(number, handler)
