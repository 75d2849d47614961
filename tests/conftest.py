"""Suite-wide policy: where every part is present (CI), a skipped test is a failure.

Tests skip only when a real part is missing (not root, no prometheus binary). In CI the
project's own setup installs every part, so a skip there means a broken install step,
and it must not pass for green. `.ci/run` sets EBPF_SLO_NO_SKIP=1.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("EBPF_SLO_NO_SKIP") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every part must be present (EBPF_SLO_NO_SKIP=1): {reason}"
