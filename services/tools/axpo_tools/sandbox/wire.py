"""What the server, its zygotes and their children say to each other (all import this;
stdlib only).

Control socket (``SOCK_SEQPACKET``, server <-> zygote), JSON messages. The zygote first sends
``{"ready": true, ...}`` or ``{"error": "..."}``; then:

* ``{"spare": {"pid", "uid", "tmp_bytes", "workdir", "t"}}`` with four descriptors attached:
  a pidfd of a child prepared for a coming request, its request socket, the read end of its
  status pipe and its working directory (the server reads ``out/`` there);
* ``{"exited": {"pid", "uid", "exit_code", "signal", "cpu_s", "maxrss_kb", "t"}}`` once a
  child has ended and been reaped (its whole PID namespace with it);
* the server sends ``{"want": tmp_bytes}`` for the next child to prepare.

Request socket (``SOCK_SEQPACKET``, server -> child): ``{"limits": {...}}`` with the stdout
and stderr pipe write ends and the body pipe read end attached.

Body pipe (server -> child, never seen by the zygote, so no request data stays in its memory
to leak into a later request): ``u32 meta length``, meta JSON ``{"code": n, "files": [[name,
n], ...]}``, the code, the files in order.

Status pipe (child -> server): the child's last act, one JSON object and a newline
(``{"exit", "error", "exc", "cpu_s", "maxrss_kb", "t"}``), or ``{"setup_error": ...}`` if it
could not get ready. The code itself could write there too: what it says only ever
concerns its own run.
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
    "SANDBOX_DIR",
    "child_env",
    "decode_body_meta",
    "encode_body",
]

SANDBOX_DIR = "/sandbox"
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
