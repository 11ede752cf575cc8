"""``axpo tool``: call one tool by hand, in-process or against a running tool server."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from axpo.contracts.domain import Image, ToolResult

from axpo.cli.common import EXIT_OK, UsageError, load_service, settings_or_usage_error


def cmd_tool(args: argparse.Namespace) -> int:
    from axpo.settings.tools import ToolsSettings

    settings = settings_or_usage_error(ToolsSettings)
    if args.server:
        result_json = _tool_remote(args)
    else:
        toolbox_mod = load_service("tools", "toolbox")
        toolbox = toolbox_mod.Toolbox(settings)
        try:
            if args.tool_command == "list":
                print(json.dumps(toolbox.openai_specs(), indent=2, ensure_ascii=False))
                return EXIT_OK
            from axpo.contracts.domain import ToolCall

            images = read_images(args.image)
            check_arguments_json(args.arguments)
            result = toolbox.call(ToolCall("call_0", args.name, args.arguments), images)
            result_json = _tool_result_json(result, args.save_images)
        finally:
            toolbox.close()
    print(json.dumps(result_json, ensure_ascii=False))
    return EXIT_OK


def check_arguments_json(raw: str) -> None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arguments must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise UsageError('--arguments must be a JSON object, e.g. \'{"query": "..."}\'')


def read_images(paths: Sequence[Path]) -> list[Image]:
    import mimetypes

    from axpo.contracts.domain import Image

    images = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--image {path}: {exc.strerror}") from exc
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        images.append(Image.from_bytes(data, mime))
    return images


def _tool_result_json(result: ToolResult, save_dir: Path | None) -> dict[str, object]:
    saved = []
    if save_dir is not None and result.images:
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            ext = "jpg" if image.mime_type == "image/jpeg" else "png"
            path = save_dir / f"result_{i}.{ext}"
            path.write_bytes(image.data)
            saved.append(str(path))
    return {
        "ok": result.error is None,
        "text": result.text,
        "images": len(result.images),
        "image_files": saved,
        "error": None
        if result.error is None
        else {"kind": result.error.kind.value, "message": result.error.message},
        "latency_ms": round(result.latency_ms, 2),
    }


def _tool_remote(args: argparse.Namespace) -> dict[str, object]:
    from axpo.contracts import convert
    from axpo.contracts.domain import ToolCall
    from axpo.rpc.client import open_channel
    from axpo.settings.base import RpcClientSettings
    from axpo.v1 import tools_pb2, tools_pb2_grpc

    with open_channel(RpcClientSettings(target=args.server)) as channel:
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        if args.tool_command == "list":
            specs = stub.ListTools(tools_pb2.ListToolsRequest()).tools
            return {
                "tools": [
                    {
                        "name": s.name,
                        "description": s.description,
                        "parameters": json.loads(s.parameters_json_schema),
                    }
                    for s in specs
                ]
            }
        check_arguments_json(args.arguments)
        images = read_images(args.image)
        response = stub.Call(
            tools_pb2.CallRequest(
                call=convert.tool_call_to_proto(ToolCall("call_0", args.name, args.arguments)),
                images=[convert.image_to_proto(i) for i in images],
            )
        )
    return _tool_result_json(convert.tool_result_from_proto(response.result), args.save_images)
