"""Writing demonstration files, the format ``axpo sft`` reads (``axpo_learner.sft.format``):
JSON lines, each image stored once under ``images/<sha256>.<ext>`` next to the file and
referenced by that relative path. In the core because both the study's demonstrations
(:mod:`axpo.study.demos`) and the learner's warm start write them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from axpo.contracts.domain import Image

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


class DemoWriter:
    """Writes demonstration records to ``path`` (created, with its ``images/`` folder): use
    ``writer.image(img)`` as a content part and ``writer.write(record)`` per demonstration."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.images_dir = self.path.parent / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("w", encoding="utf-8")
        self.count = 0

    def image(self, image: Image) -> dict[str, str]:
        """The content part of ``image``, writing its file the first time it is seen."""
        if not image.data:
            raise ValueError(f"image {image.sha256[:12]}: no bytes to write")
        name = f"{image.sha256}.{_EXTENSIONS.get(image.mime_type, 'img')}"
        target = self.images_dir / name
        if not target.exists():
            tmp = target.with_suffix(".partial")
            tmp.write_bytes(image.data)
            tmp.replace(target)
        return {"type": "image", "image": f"images/{name}"}

    def write(self, record: Mapping[str, Any]) -> None:
        """One demonstration, as one line."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DemoWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
