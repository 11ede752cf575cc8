"""axpo.telemetry.logs: text and JSON line formats, idempotent configuration."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from axpo.settings.base import LogSettings
from axpo.telemetry.logs import configure_logging, get_logger, log_event

SCORE = "/axpo.v1.VerifierService/Score"


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_logs_json_format_has_fields() -> None:
    configure_logging(LogSettings(format="json", level="DEBUG"), "verifier")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_axpo_handler", False)]
    assert len(ours) == 1
    stream = io.StringIO()
    ours[0].setStream(stream)  # type: ignore[attr-defined]
    log = get_logger("axpo.test")
    log_event(log, logging.INFO, "rpc", method=SCORE, code="OK", ms=1.5)
    log.warning("plain", extra={"fields": {"msg": "clash"}})
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["ts"].endswith("Z")
    assert "T" in first["ts"]
    assert {k: v for k, v in first.items() if k != "ts"} == {
        "level": "INFO",
        "service": "verifier",
        "logger": "axpo.test",
        "msg": "rpc",
        "method": SCORE,
        "code": "OK",
        "ms": 1.5,
    }
    assert second["msg"] == "plain"
    assert second["field_msg"] == "clash"


@pytest.mark.usefixtures("restore_root_logger")
def test_logs_text_format_and_idempotent_configure() -> None:
    configure_logging(LogSettings(format="json"), "verifier")
    configure_logging(LogSettings(format="text", level="WARNING"), "verifier")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_axpo_handler", False)]
    assert len(ours) == 1
    assert root.level == logging.WARNING
    stream = io.StringIO()
    ours[0].setStream(stream)  # type: ignore[attr-defined]
    log = get_logger("axpo.test")
    log_event(log, logging.INFO, "hidden")
    log_event(log, logging.WARNING, "rpc", method=SCORE, code="UNAVAILABLE", details="a b")
    (line,) = stream.getvalue().splitlines()
    ts, rest = line.split(" ", 1)
    assert ts.endswith("Z")
    assert len(ts) == len("2026-11-25T01:02:03.456Z")
    assert rest == f'WARNING verifier rpc method={SCORE} code=UNAVAILABLE details="a b"'
