"""Turning SIGINT and SIGTERM into a request to stop at the next safe point, so a long job can write
what it finished before it exits (with 128 + the signal's number, as a shell reports it)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first SIGINT/SIGTERM inside `stop_on_signals`; a second one stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal or 0)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = number


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the returned `StopRequest` instead of killing the
    process (in the main thread only; elsewhere nothing is installed); handlers restored on exit."""
    request = StopRequest()
    try:
        previous = {number: signal.signal(number, request._handle) for number in SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
