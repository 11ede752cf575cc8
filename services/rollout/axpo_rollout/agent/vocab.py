"""The checkpoint's tokenizer, as the loop sees it: :class:`Vocab`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from axpo.contracts import chat


class Vocab:
    """The checkpoint's tokenizer (``tokenizer.json``, the Rust ``tokenizers`` library) and the
    ids of the tags the loop looks for, found by token string (never hard-coded)."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (the rollout loop needs it)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self._lock = threading.Lock()
        self.tool_call_open = self._id(chat.TOOL_CALL_OPEN)
        self.tool_call_close = self._id(chat.TOOL_CALL_CLOSE)
        self.think_close = self._id(chat.THINK_CLOSE)
        self.im_end = self._id(chat.IM_END)
        self.image_pad = self._id("<|image_pad|>")

    def _id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer has no {token!r} token")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        with self._lock:  # the Rust tokenizer is not documented as thread-safe for encode
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))
