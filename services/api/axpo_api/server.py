"""``axpo serve api``: the application under uvicorn until SIGTERM/SIGINT."""

from __future__ import annotations

import socket
from pathlib import Path

import uvicorn

from axpo.settings.api import ApiSettings
from axpo.telemetry.logs import configure_logging, get_logger
from axpo_api.app import create_app

log = get_logger(__name__)

# Seconds open requests (SSE streams mostly) get after SIGTERM before they are closed; the
# client reconnects to another replica (or this one restarted) with Last-Event-ID.
GRACEFUL_S = 3


def serve(settings: ApiSettings, port_file: Path | None = None) -> None:
    """Bind, write the bound port to ``port_file``, serve until a signal."""
    configure_logging(settings.log, service="api")
    app = create_app(settings)
    # Bound here, not by uvicorn, so port 0 is known before serving and written for the
    # caller; connections made before uvicorn accepts wait in the listen backlog.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    log.info("api on http://%s:%d (redis %s)", settings.host, port, _redacted(settings.redis_url))
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    config = uvicorn.Config(
        app,
        log_config=None,  # our logging (configure_logging), one line per request
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_S,
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=[sock])


def _redacted(url: str) -> str:
    """The Redis URL without its password (the log must not carry secrets)."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"
