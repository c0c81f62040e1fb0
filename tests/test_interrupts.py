"""The command line's signal handler when a finalizer swallows its KeyboardInterrupt."""

import os
import signal
import sys

import pytest

from vizpipe import interrupts


class SignalsWhenCollected:
    """Sends SIGTERM to this process from ``__del__``, so the handler runs inside the finalizer."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


def test_swallowed_interrupt_raised_at_next_check(monkeypatch):
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    previous = interrupts.install()
    try:
        interrupts.raise_if_requested()  # nothing recorded yet
        finalized = SignalsWhenCollected()
        del finalized  # Python drops the KeyboardInterrupt raised in __del__
        assert [type(item.exc_value) for item in dropped] == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            interrupts.raise_if_requested()
    finally:
        interrupts.restore(previous)
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]


def test_install_clears_an_earlier_signal():
    previous = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.pause()  # not reached: the handler raises first
        interrupts.restore(interrupts.install())
        interrupts.raise_if_requested()
    finally:
        interrupts.restore(previous)
