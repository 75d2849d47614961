"""Hypothesis settings for the fuzz tests (tests/unit/test_fuzz_*.py), chosen by an env var.

    EBPF_SLO_FUZZ=ci    (default) a few thousand examples in all, well under a minute
    EBPF_SLO_FUZZ=long  `make fuzz`: 20x as many per test, no time limit per example

Profiles are applied per test with `@fuzz(weight)`, not loaded globally, so the suite's
other hypothesis tests keep their own settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

F = TypeVar("F", bound=Callable[..., Any])

PROFILE = os.environ.get("EBPF_SLO_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise RuntimeError(f"EBPF_SLO_FUZZ={PROFILE!r}: use ci or long")
SCALE = 20 if PROFILE == "long" else 1

settings.register_profile(
    "fuzz-ci", deadline=None, database=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz-long", parent=settings.get_profile("fuzz-ci"))


def fuzz(examples: int) -> Callable[[F], F]:
    """`examples` per CI run (times SCALE under `make fuzz`)."""
    return settings(settings.get_profile(f"fuzz-{PROFILE}"), max_examples=examples * SCALE)
