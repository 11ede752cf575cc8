"""``python``: model-written code in the sandbox (axpo_tools.sandbox), images in and out."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from axpo.contracts.domain import Image, ToolError, ToolErrorKind, ToolResult
from axpo.settings.tools import PythonToolSettings
from axpo_tools.errors import ToolFailure
from axpo_tools.sandbox import PythonSandbox, SandboxLimits

NAME = "python"
MAX_CODE_CHARS = 64 * 1024
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}


def image_file_name(index: int, image: Image) -> str:
    return f"image_{index}.{_EXTENSIONS.get(image.mime_type, 'png')}"


class PythonTool:
    name = NAME

    def __init__(self, settings: PythonToolSettings) -> None:
        self.settings = settings
        self.limits = SandboxLimits(
            wall_s=settings.wall_s,
            cpu_s=settings.cpu_s,
            memory_bytes=settings.memory_mb << 20,
            file_bytes=settings.file_mb << 20,
            tmp_bytes=settings.tmp_mb << 20,
            max_processes=settings.max_processes,
            output_bytes=settings.output_kb << 10,
            max_images_out=settings.max_images_out,
        )
        self._sandbox: PythonSandbox | None = None
        self._lock = threading.Lock()

    def start(self) -> PythonSandbox:
        """Start the sandbox (warm pool) now; raises SandboxUnavailableError where the
        isolation primitives are missing and the opt-out is not set."""
        with self._lock:
            if self._sandbox is None:
                self._sandbox = PythonSandbox(
                    self.limits,
                    workers=self.settings.workers,
                    warm=self.settings.warm,
                    allow_unsandboxed=self.settings.allow_unsandboxed,
                )
            return self._sandbox

    def spec(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": NAME,
                "description": "Run Python 3 code in a sandbox (numpy and PIL available, no "
                "network). The conversation's images are files image_0.png, image_1.png, ... "
                "in the working directory. Print results to see them; images saved under out/ "
                "are shown to you.",
                "parameters": {
                    "type": "object",
                    "properties": {"code": {"type": "string", "description": "The code to run."}},
                    "required": ["code"],
                },
            },
        }

    def __call__(
        self, arguments: Mapping[str, Any], images: Sequence[Image], deadline_s: float | None = None
    ) -> ToolResult:
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolFailure(ToolErrorKind.BAD_ARGUMENTS, "code must be a non-empty string")
        if len(code) > MAX_CODE_CHARS:
            raise ToolFailure(
                ToolErrorKind.BAD_ARGUMENTS, f"code is longer than {MAX_CODE_CHARS} characters"
            )
        limits = self.limits
        if deadline_s is not None and deadline_s < limits.wall_s:
            limits = dataclasses.replace(limits, wall_s=max(0.05, deadline_s))
        files = {image_file_name(i, img): img.data for i, img in enumerate(images) if img.data}
        run = self.start().run(code, files=files, limits=limits)
        text = run.stdout
        if run.stderr:
            text += ("\n" if text and not text.endswith("\n") else "") + run.stderr
        if run.exit_code not in (0, None) and not run.error_kind:
            text += f"\n(exit code {run.exit_code})"
        error = None
        if run.error_kind is not None:
            error = ToolError(run.error_kind, run.message)
            text = f"{text}\n{run.message}" if text else run.message
        return ToolResult(
            text=text.strip("\n") or "(no output)",
            images=tuple(Image.from_bytes(data, "image/png") for data in run.images),
            error=error,
        )

    def close(self) -> None:
        with self._lock:
            if self._sandbox is not None:
                self._sandbox.close()
                self._sandbox = None
