"""A run's stdout and stderr, kept under one shared byte budget."""

from __future__ import annotations

import contextlib
import os

__all__ = ["OUTPUT_KILL_FACTOR", "OUTPUT_KILL_MIN", "Capture", "drain"]

# Output beyond output_bytes * OUTPUT_KILL_FACTOR (at least 1 MiB) stops the run.
OUTPUT_KILL_FACTOR = 64
OUTPUT_KILL_MIN = 1 << 20


class Capture:
    """stdout and stderr with one shared byte budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = {1: bytearray(), 2: bytearray()}
        self.dropped = {1: 0, 2: 0}
        self.total = 0

    def feed(self, stream: int, data: bytes) -> None:
        room = self.limit - len(self.kept[1]) - len(self.kept[2])
        take = data[: max(room, 0)]
        self.kept[stream] += take
        self.dropped[stream] += len(data) - len(take)
        self.total += len(data)

    def text(self, stream: int) -> str:
        text = self.kept[stream].decode("utf-8", "replace")
        if self.dropped[stream]:
            text += f"\n[... output truncated: {self.dropped[stream]} bytes omitted]"
        return text


def drain(fd: int, capture: Capture, stream: int, limit: int) -> None:
    """Read what the pipe holds now (its writers are already killed), up to ``limit`` bytes."""
    os.set_blocking(fd, False)
    with contextlib.suppress(OSError):
        while capture.total <= limit:
            data = os.read(fd, 1 << 16)
            if not data:
                return
            capture.feed(stream, data)
