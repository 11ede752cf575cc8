"""What the server and its zygotes say to each other (both sides import this; stdlib only).

Control socket (``SOCK_SEQPACKET``, server <-> zygote): the zygote first sends one JSON
object, ``{"ready": true, ...}`` or ``{"error": "..."}``; then per request the server sends a
JSON header with four descriptors attached: the stdout and stderr pipe write ends, the body
pipe read end and the result socket.

Body pipe (server -> sandboxed child, never read by the zygote, so no request data stays in
the zygote's memory to leak into a later request): ``u32 meta length``, meta JSON
``{"code": n, "files": [[name, n], ...]}``, the code, the files in order.

Result socket (``SOCK_SEQPACKET``, zygote -> server): ``b"P"`` with a pidfd of the sandboxed
process once it runs, then the JSON result with the ``out/`` image files attached as open
descriptors (the zygote never reads their contents), then end of file.
"""

from __future__ import annotations

import json
import struct
from typing import Any

__all__ = [
    "ENV",
    "EXIT_SETUP_FAILED",
    "MAX_META",
    "MAX_STATUS",
    "PIDFD_MESSAGE",
    "SANDBOX_DIR",
    "child_env",
    "decode_body_meta",
    "encode_body",
]

SANDBOX_DIR = "/sandbox"
PIDFD_MESSAGE = b"P"
MAX_META = 1 << 20
MAX_STATUS = 1 << 14
EXIT_SETUP_FAILED = 71  # EX_OSERR

# The whole environment a sandboxed process (and the zygote it forks from) ever has.
ENV: dict[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": SANDBOX_DIR,
    "TMPDIR": SANDBOX_DIR + "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8",
    "MPLBACKEND": "Agg",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def child_env(workdir: str) -> dict[str, str]:
    env = dict(ENV)
    env["HOME"] = workdir
    env["TMPDIR"] = workdir + "/tmp"
    return env


def encode_body(code: str, files: list[tuple[str, bytes]]) -> list[bytes]:
    """The body as chunks (files are not copied)."""
    raw_code = code.encode("utf-8", "surrogatepass")
    meta = json.dumps({"code": len(raw_code), "files": [[n, len(d)] for n, d in files]})
    raw_meta = meta.encode()
    return [struct.pack("=I", len(raw_meta)), raw_meta, raw_code, *(d for _, d in files)]


def decode_body_meta(raw: bytes) -> tuple[int, list[tuple[str, int]]]:
    meta: Any = json.loads(raw)
    code_len = int(meta["code"])
    files = [(str(name), int(size)) for name, size in meta["files"]]
    return code_len, files
