"""Threads that each loop until stopped: the node's stages (router, workers, outbox,
storage commitment) start and stop theirs through one base."""

from __future__ import annotations

import threading


class Loops:
    """Threads that each loop until ``stop_event`` is set, started and stopped
    together; ``wake`` cuts a loop's wait short."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.wake.set()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout)
