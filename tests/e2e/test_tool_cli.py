"""`axpo tool ...` and `axpo serve tools` as a person runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image as PILImage

pytestmark = pytest.mark.e2e

AXPO = [sys.executable, "-m", "axpo.cli.main"]


def axpo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AXPO, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "chart.png"
    img = PILImage.new("RGB", (400, 300), (255, 255, 255))
    img.paste((10, 10, 200), (200, 150, 400, 300))
    img.save(path)
    return path


def test_tool_list():
    out = axpo("tool", "list")
    assert out.returncode == 0, out.stderr
    names = [t["function"]["name"] for t in json.loads(out.stdout)]
    assert names == ["image_zoom_in_tool", "search", "python"]


def test_tool_call_zoom_saves_the_crop(image_file, tmp_path):
    out = axpo(
        "tool",
        "call",
        "image_zoom_in_tool",
        "--arguments",
        '{"bbox_2d": [500, 500, 1000, 1000], "label": "blue"}',
        "--image",
        str(image_file),
        "--save-images",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True
    assert result["error"] is None
    assert result["images"] == 1
    crop = PILImage.open(result["image_files"][0]).convert("RGB")
    pixel = crop.getpixel((crop.width // 2, crop.height // 2))
    assert all(abs(a - b) <= 12 for a, b in zip(pixel, (10, 10, 200), strict=True))  # JPEG
    assert result["latency_ms"] > 0


def test_tool_call_python_in_the_sandbox():
    out = axpo(
        "tool",
        "call",
        "python",
        "--arguments",
        json.dumps({"code": "import os; print(sum(range(10)), os.getuid() != 0)"}),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] is True, result
    assert result["text"] == "45 True"


def test_tool_error_is_a_result_not_a_crash():
    out = axpo("tool", "call", "search", "--arguments", '{"k": 3}')
    assert out.returncode == 0
    result = json.loads(out.stdout)
    assert result["ok"] is False
    assert result["error"]["kind"] == "bad_arguments"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tool", "call", "search", "--arguments", "{nope"], "--arguments"),
        (["tool", "call", "search", "--arguments", "[1]"], "--arguments"),
        (["tool", "call", "search", "--arguments", "{}", "--image", "/no/such.png"], "--image"),
        (["tool", "call", "search"], "--arguments"),
    ],
    ids=["bad-json", "not-object", "missing-image", "no-arguments"],
)
def test_bad_arguments_exit_2(args, message):
    out = axpo(*args)
    assert out.returncode == 2
    assert message in out.stderr


def test_serve_tools_and_call_through_grpc(tmp_path, image_file):
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [*AXPO, "serve", "tools", "--port", "0", "--port-file", str(port_file)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AXPO_TOOLS_PYTHON__WORKERS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        listed = json.loads(axpo("tool", "list", "--server", target).stdout)
        assert {t["name"] for t in listed["tools"]} == {"image_zoom_in_tool", "search", "python"}
        out = axpo(
            "tool",
            "call",
            "python",
            "--server",
            target,
            "--image",
            str(image_file),
            "--arguments",
            json.dumps({"code": "from PIL import Image; print(Image.open('image_0.png').size)"}),
        )
        result = json.loads(out.stdout)
        assert result["ok"] is True, result
        assert result["text"] == "(400, 300)"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0
