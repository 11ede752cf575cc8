"""``axpo bench tools``: latency and throughput of each tool through the real gRPC service.

The service runs as a separate process (``axpo serve tools``), started twice: with the warm
python pool and without it (a fresh interpreter per call), so warm and cold are measured side
by side. Each call sends the trajectory's images with their bytes, as a rollout worker does.
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from axpo.contracts import convert
from axpo.contracts.domain import Image, ToolCall
from axpo.rpc.client import open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings
from axpo.v1 import tools_pb2, tools_pb2_grpc

PYTHON_CODE = "print(sum(range(1000)))"


def source_image(size: int = 2048, seed: int = 0) -> Image:
    """A photo-like 2048x2048 PNG: smooth gradients, shapes and some texture."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x * 200 + 30, y * 180 + 40, (1 - x) * 120 + y * 60], axis=-1)
    rgb += rng.normal(0, 6, rgb.shape)
    img = PILImage.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = rng.integers(0, size - 200, 2)
        w, h = rng.integers(30, 200, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


def _request(
    name: str, arguments: dict[str, Any], images: tuple[Image, ...] = ()
) -> tools_pb2.CallRequest:
    return tools_pb2.CallRequest(
        call=convert.tool_call_to_proto(ToolCall("call_0", name, json.dumps(arguments))),
        images=[convert.image_to_proto(i) for i in images],
    )


def _p50_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@contextmanager
def _server(warm: bool) -> Iterator[tools_pb2_grpc.ToolServiceStub]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        env = {
            **os.environ,
            "AXPO_TOOLS_RPC__LOG_REQUESTS": "false",
            "AXPO_TOOLS_LOG__LEVEL": "WARNING",
            "AXPO_TOOLS_PYTHON__WARM": str(warm).lower(),
            "AXPO_TOOLS_PYTHON__WORKERS": "8",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "axpo.cli.main",
                "serve",
                "tools",
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() or not port_file.read_text().strip():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("tool server did not start (see its log above)")
                time.sleep(0.05)
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            with open_channel(RpcClientSettings(target=target, deadline_s=120)) as channel:
                wait_for_health(channel, timeout_s=30)
                yield tools_pb2_grpc.ToolServiceStub(channel)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _check(response: tools_pb2.CallResponse) -> tools_pb2.CallResponse:
    if response.result.HasField("error"):
        raise RuntimeError(f"tool failed during the benchmark: {response.result.error.message}")
    return response


def run(calls: int = 50) -> dict[str, Any]:
    rng = random.Random(0)
    image = source_image()
    python = _request("python", {"code": PYTHON_CODE})
    out: dict[str, Any] = {
        "calls": calls,
        "crop_source": "2048x2048 PNG",
        "crop_source_bytes": len(image.data),
    }
    with _server(warm=True) as stub:

        def crop() -> None:
            x, y = rng.randint(0, 800), rng.randint(0, 800)
            _check(
                stub.Call(
                    _request(
                        "image_zoom_in_tool",
                        {
                            "bbox_2d": [x, y, x + rng.randint(50, 200), y + rng.randint(50, 200)],
                            "label": "region",
                        },
                        (image,),
                    )
                )
            )

        out["crop_first_ms"] = round(_p50_ms(crop, 1), 2)  # decodes the source
        out["crop_p50_ms"] = round(_p50_ms(crop, calls), 2)
        _p50_ms(lambda: _check(stub.Call(python)), 5)
        out["python_p50_ms"] = round(_p50_ms(lambda: _check(stub.Call(python)), calls), 2)
        with ThreadPoolExecutor(8) as pool:
            n = calls * 4
            start = time.perf_counter()
            list(pool.map(lambda _: _check(stub.Call(python)), range(n)))
            out["python_per_s"] = round(n / (time.perf_counter() - start), 1)
        search = _request("search", {"query": "In what year was the town founded?"})
        out["search_p50_ms"] = round(_p50_ms(lambda: _check(stub.Call(search)), calls), 2)
    with _server(warm=False) as stub:
        _check(stub.Call(python))
        out["python_cold_p50_ms"] = round(
            _p50_ms(lambda: _check(stub.Call(python)), max(10, calls // 2)), 2
        )
    out["python_warm_speedup"] = round(out["python_cold_p50_ms"] / out["python_p50_ms"], 1)
    return out


def print_table(result: dict[str, Any]) -> None:
    print(
        f"tool server through gRPC (service in its own process, p50 over {result['calls']} calls):"
    )
    print(
        f"  crop 2048x2048 p50   : {result['crop_p50_ms']:8.2f} ms "
        f"(first call, decoding: {result['crop_first_ms']:.1f} ms)"
    )
    print(f"  python warm p50      : {result['python_p50_ms']:8.2f} ms")
    print(
        f"  python cold p50      : {result['python_cold_p50_ms']:8.2f} ms "
        f"({result['python_warm_speedup']}x slower)"
    )
    print(f"  python calls/s (x8)  : {result['python_per_s']:8.1f}")
    print(f"  search p50           : {result['search_p50_ms']:8.2f} ms")
