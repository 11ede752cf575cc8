"""A server-sent events parser (the WHATWG rules the api's events need: ``id``, ``event``,
``data`` fields, comments, a blank line ends an event)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawEvent:
    id: str | None
    event: str
    data: str


class SseParser:
    """Feed it lines (without their line ending); it returns an event at each blank line.

    >>> p = SseParser()
    >>> [p.feed(x) for x in ["id: 1-0", "event: step", 'data: {"a": 1}', ""]][-1]
    RawEvent(id='1-0', event='step', data='{"a": 1}')
    """

    def __init__(self) -> None:
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> RawEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = RawEvent(self._id, self._event or "message", "\n".join(self._data))
            self._id, self._event, self._data = None, "", []
            return event
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
