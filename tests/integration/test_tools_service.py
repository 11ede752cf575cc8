"""The tool server's real gRPC server on port 0 (real sandbox), through the generated stub."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image as PILImage

from axpo.contracts import convert
from axpo.contracts.domain import Image, ToolCall
from axpo.rpc.client import open_channel, wait_for_health
from axpo.settings.base import RpcClientSettings, RpcServerSettings
from axpo.settings.tools import PythonToolSettings, ToolsSettings
from axpo.v1 import common_pb2, tools_pb2, tools_pb2_grpc
from axpo_tools.server import Admission, start
from axpo_tools.toolbox import Toolbox

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stub():
    settings = ToolsSettings(
        rpc=RpcServerSettings(port=0, log_requests=False),
        max_concurrency=4,
        python=PythonToolSettings(workers=2, wall_s=5),
    )
    toolbox = Toolbox(settings)
    toolbox.start()
    running = start(settings, toolbox)
    channel = open_channel(RpcClientSettings(target=running.address, deadline_s=60))
    wait_for_health(channel, timeout_s=10)
    yield tools_pb2_grpc.ToolServiceStub(channel)
    channel.close()
    running.stop(grace=1)
    toolbox.close()


def request(name: str, arguments: dict, images=(), deadline_ms: int = 0):
    return tools_pb2.CallRequest(
        call=convert.tool_call_to_proto(ToolCall("call_0", name, json.dumps(arguments))),
        images=[convert.image_to_proto(i) for i in images],
        deadline_ms=deadline_ms,
    )


def picture() -> Image:
    img = PILImage.new("RGB", (640, 480), (200, 200, 200))
    img.paste((0, 160, 0), (320, 240, 640, 480))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return Image.from_bytes(buf.getvalue(), "image/png")


def test_list_tools(stub):
    tools = stub.ListTools(tools_pb2.ListToolsRequest()).tools
    assert {t.name for t in tools} == {"image_zoom_in_tool", "search", "python"}
    for tool in tools:
        assert json.loads(tool.parameters_json_schema)["type"] == "object"


def test_zoom_returns_an_image(stub):
    result = stub.Call(
        request(
            "image_zoom_in_tool", {"bbox_2d": [500, 500, 1000, 1000], "label": "green"}, [picture()]
        )
    ).result
    assert not result.HasField("error")
    crop = PILImage.open(io.BytesIO(result.images[0].data)).convert("RGB")
    pixel = crop.getpixel((crop.width // 2, crop.height // 2))
    assert all(abs(a - b) <= 12 for a, b in zip(pixel, (0, 160, 0), strict=True))  # JPEG
    assert result.latency_ms > 0


def test_python_reads_the_trajectory_image_and_returns_a_figure(stub):
    code = (
        "from PIL import Image\nimport numpy as np\n"
        "im = Image.open('image_0.png'); a = np.asarray(im)\n"
        "print(im.size, int(a[..., 1].max()))\n"
        "Image.fromarray(a[240:, 320:]).save('out/corner.png')\n"
    )
    result = stub.Call(request("python", {"code": code}, [picture()])).result
    assert not result.HasField("error"), result.error.message
    assert "(640, 480) 200" in result.text
    assert len(result.images) == 1
    corner = PILImage.open(io.BytesIO(result.images[0].data))
    assert corner.size == (320, 240)


def test_python_timeout_is_a_tool_error(stub):
    result = stub.Call(request("python", {"code": "while True: pass"}, deadline_ms=500)).result
    assert result.error.kind == common_pb2.TOOL_ERROR_KIND_TIMEOUT


def test_errors_reach_the_model_as_text(stub):
    result = stub.Call(request("search", {"k": 2})).result
    assert result.error.kind == common_pb2.TOOL_ERROR_KIND_BAD_ARGUMENTS
    assert "'query' is a required property" in result.text


def test_concurrent_calls_of_every_tool(stub):
    image = picture()
    calls = [
        request("search", {"query": "Which town was founded first?"}),
        request("image_zoom_in_tool", {"bbox_2d": [0, 0, 500, 500], "label": "x"}, [image]),
        request("python", {"code": "print(sum(range(1000)))"}),
    ] * 8
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: stub.Call(r).result, calls))
    assert all(not r.HasField("error") for r in results), [r.error.message for r in results]
    assert all(r.text == "499500" for r in results[2::3])


def test_admission_queue_and_refusal():
    gate = Admission(concurrency=1, queue=1)
    assert gate.enter(0.1) is True  # the one slot
    waited: list[bool | None] = []
    waiter = threading.Thread(target=lambda: waited.append(gate.enter(5)))
    waiter.start()
    time.sleep(0.2)
    assert gate.enter(0.1) is None  # waiting room full
    gate.leave()
    waiter.join(5)
    assert waited == [True]
    assert gate.enter(0.05) is False  # slot busy, waited in vain
    gate.leave()


def test_a_full_server_refuses_with_resource_exhausted():
    settings = ToolsSettings(
        rpc=RpcServerSettings(port=0, log_requests=False),
        max_concurrency=1,
        max_queue=0,
        python=PythonToolSettings(workers=1),
    )
    toolbox = Toolbox(settings)
    running = start(settings, toolbox)
    try:
        channel = open_channel(RpcClientSettings(target=running.address, max_attempts=1))
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        slow = request("python", {"code": "import time; time.sleep(1.5)"})
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(stub.Call, slow)
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as err:
                stub.Call(request("search", {"query": "x"}))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not first.result().result.HasField("error")
        channel.close()
    finally:
        running.stop(grace=1)
        toolbox.close()
