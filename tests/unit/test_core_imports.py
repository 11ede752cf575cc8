"""The core package stays light: importing any of its modules pulls in no torch, transformers,
vLLM or matplotlib (the model builder and the report import them inside their functions).
Checked in a fresh interpreter, so this test process's own imports do not hide it."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import axpo

HEAVY = ("torch", "transformers", "vllm", "matplotlib")


def _core_modules() -> list[str]:
    names = [
        m.name
        for m in pkgutil.walk_packages(axpo.__path__, prefix="axpo.")
        if not m.name.startswith("axpo.v1.") and m.name != "axpo.__main__"
    ]
    assert len(names) > 30, names  # the walk found the package, not an empty tree
    return names


def _heavy_after_import(modules: list[str]) -> dict[str, list[str]]:
    code = (
        "import importlib, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "out = {}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    out[name] = sorted(h for h in heavy if h in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


def test_importing_the_core_loads_no_heavy_library():
    loaded = _heavy_after_import(_core_modules())
    # Modules are imported in order in one interpreter: the first one with a heavy library
    # loaded is the one that imported it.
    first = next(((name, heavy) for name, heavy in loaded.items() if heavy), None)
    assert first is None, f"{first[0]} imports {first[1]} at import time"


def test_the_check_sees_a_heavy_import():
    # The probe itself works: a module that does import torch is reported.
    loaded = _heavy_after_import(["json", "torch"])
    assert loaded["json"] == []
    assert "torch" in loaded["torch"]
