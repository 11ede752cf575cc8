"""Tool specs (OpenAI function format) that tests render into the system turn."""

from __future__ import annotations

from typing import Any

ZOOM_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "image_zoom_in_tool",
        "description": "Zoom in on a region of an image (bbox_2d in relative 0-1000 coordinates).",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {"type": "array", "items": {"type": "number"}},
                "label": {"type": "string"},
                "img_idx": {"type": "integer"},
            },
            "required": ["bbox_2d", "label"],
        },
    },
}
