"""The images a run leaves in ``out/``, read by the server from the run's working directory.

(JPEG files there were already converted to PNG by the child itself, unprivileged: see
:func:`axpo_tools.sandbox.child.spare_child`.)
"""

from __future__ import annotations

import os
import stat
import struct

from axpo_tools.sandbox.api import SandboxLimits

__all__ = ["collect_images"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MAX_IMAGE_PIXELS = 64 << 20


def _read_image(fd: int, max_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = os.pread(fd, min(1 << 20, max_bytes + 1 - size), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    if size > max_bytes or len(data) < 24 or not data.startswith(_PNG_SIGNATURE):
        return None
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0 or width * height > _MAX_IMAGE_PIXELS:
        return None
    return data


def collect_images(sbx_fd: int, limits: SandboxLimits) -> tuple[tuple[bytes, ...], int, int]:
    """The PNG images in the run's out/ (name order, up to ``max_images_out``), how many more
    there were, and how many were not valid images (or not regular files).

    ``sbx_fd`` is the run's working directory, its own tmpfs. Every step is relative to a
    descriptor and refuses symbolic links; only regular files are read (a FIFO or device
    would be skipped), at most ``file_bytes`` of each.
    """
    try:
        out_fd = os.open("out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=sbx_fd)
    except OSError:
        return (), 0, 0
    images: list[bytes] = []
    opened = skipped = bad = 0
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        names = sorted(n for n in os.listdir(out_fd) if n.lower().endswith(_IMAGE_SUFFIXES))
        for name in names:
            if opened >= limits.max_images_out:
                skipped += 1
                continue
            try:
                fd = os.open(name, flags, dir_fd=out_fd)
            except OSError:
                bad += 1
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    bad += 1
                    continue
                opened += 1
                data = _read_image(fd, limits.file_bytes)
            finally:
                os.close(fd)
            if data is None:
                bad += 1
            else:
                images.append(data)
    finally:
        os.close(out_fd)
    return tuple(images), skipped, bad
