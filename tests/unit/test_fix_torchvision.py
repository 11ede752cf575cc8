"""scripts/fix_torchvision.py: torchvision and transformers' processors import beside CPU torch,
and running the fix again changes nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fix_torchvision.py"

UNGUARDED = """\
@register_meta("roi_align")
def meta_roi_align(input, rois): ...


@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold): ...


@torch.library.register_fake("torchvision::qnms")
def meta_qnms(dets, scores, iou_threshold): ...
"""


@pytest.fixture(scope="module")
def fix() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fix_torchvision", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )


def test_guard_changes_only_the_nms_registrations_and_only_once(fix: ModuleType) -> None:
    patched, count = fix.guard_nms_registrations(UNGUARDED)
    assert count == 2
    assert '@register_meta("roi_align")' in patched
    assert patched.count("if torchvision.extension._has_ops() else (lambda fn: fn))") == 2
    compile(patched, "patched", "exec")  # still valid Python
    assert fix.guard_nms_registrations(patched) == (patched, 0)


def test_torchvision_and_the_qwen_vl_processor_import() -> None:
    proc = _run(
        "import torchvision, torchvision.transforms.v2.functional\n"
        "from transformers import AutoProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _meta_registrations() -> Path:
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None
    assert spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"


def test_the_script_is_idempotent() -> None:
    first = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    digest = hashlib.sha256(_meta_registrations().read_bytes()).hexdigest()
    second = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing to do" in second.stdout
    assert "uninstalling" not in second.stdout
    assert hashlib.sha256(_meta_registrations().read_bytes()).hexdigest() == digest
