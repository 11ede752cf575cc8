"""One Verifier (and its math worker pool) for the whole verifier unit suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from axpo.settings.verifier import VerifierSettings
from axpo_verifier.verifier import Verifier

# Short, so the hostile tests that must hit the limit stay quick.
TIME_LIMIT_S = 1.5


@pytest.fixture(scope="session")
def verifier() -> Iterator[Verifier]:
    settings = VerifierSettings(default_time_limit_s=TIME_LIMIT_S, math_workers=2)
    with Verifier(settings) as v:
        assert v.math_checker.wait_ready(60), "math workers did not start"
        yield v
