"""The one exception tools raise for a call that cannot be served; the server turns it into a
``ToolResult`` whose error the model reads."""

from __future__ import annotations

from axpo.contracts.domain import ToolErrorKind


class ToolFailure(Exception):
    """A tool call failed for a reason the model should read (bad box, unknown image...)."""

    def __init__(self, kind: ToolErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
