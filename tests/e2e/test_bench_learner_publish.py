"""``axpo bench learner --publish-only``: weight publication to one real inference replica
(``axpo serve inference`` as a subprocess) with both transports, against a raw copy of the
same bytes (2 timed versions per transport). Speed is not asserted here, only that the
figures are there and sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.e2e

AXPO = [sys.executable, "-m", "axpo"]
REPO = Path(__file__).resolve().parents[2]

POSITIVE = (
    "publish_s",
    "publish_stream_s",
    "copy_s",
    "publish_vs_copy_ratio",
    "stream_vs_copy_ratio",
    "publish_bytes",
    "publish_file_bytes",
)


def test_bench_learner_publish_prints_every_figure():
    out = subprocess.run(
        [*AXPO, "bench", "learner", "--json", "--publish-only", "--publish-versions", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result.keys() >= {*POSITIVE, "publish_versions", "machine", "date", "definitions"}
    for key in POSITIVE:
        assert result[key] > 0, key
    assert result["publish_versions"] == 2
    assert len(result["publish_s_all"]) == len(result["publish_stream_s_all"]) == 2
    assert len(result["copy_s_all"]) == 2
    # The path transport writes the tensors plus a safetensors header.
    assert result["publish_file_bytes"] > result["publish_bytes"]
    assert set(result["definitions"]) >= {"publish_s", "copy_s", "publish_vs_copy_ratio"}
    assert "learner_tokens_per_s" not in result  # --publish-only skips the training bench
