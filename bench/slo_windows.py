"""Cost of the SLO windows: memory and evaluation time for many objectives with 30-day windows.

    python -m bench.slo_windows [--objectives 100] [--window 30d] [--closes 360]

No capture, no server: the embedded evaluator alone, with every coarse bucket of every
window holding counts (30 days of traffic, one batch per 5 minutes) and a full status-page
chart (`--closes` closed intervals). Prints one line: memory per objective (tracemalloc,
Python allocations of the evaluator), how much the process' RSS grew for all, the time to close one push
interval for all objectives (median and worst of `--closes`), and the size and time of one
state save (the JSON `--state-dir` gets, without the disk write).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import tracemalloc

from exporter.slo.evaluate import Evaluator
from exporter.slo.manifest import Objective, parse_duration, parse_manifest

PUSH_S = 10
T0 = 1_700_000_000


def manifest(count: int, window: str) -> str:
    docs = []
    for i in range(count):
        category = "latency_target: 150ms, category: latency" if i % 2 else "category: availability"
        docs.append(
            "apiVersion: reliably.com/v1\nkind: Objective\n"
            f"metadata: {{labels: {{name: objective {i}, service: bench}}}}\n"
            f"spec: {{indicatorSelector: {{{category}, port: '{8000 + i}'}}, objectivePercent: 99.9, "
            f"window: {window}}}\n"
        )
    return "---\n".join(docs)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def build(objectives: list[Objective], window_s: float, closes: int, *,
          varied: bool = True) -> tuple[Evaluator, list[float]]:
    evaluator = Evaluator(objectives, PUSH_S, start_s=T0 - window_s)
    # Every 5-minute bucket of the window gets counts for every objective: the arrays are
    # allocated up front, so this only shows that nothing grows with traffic.
    for ring in evaluator._rings:
        for second in range(0, int(window_s), 300):
            # Varied counts, so the saved state compresses like real traffic. (Under tracemalloc
            # every int above 256 is a traced allocation: that pass uses small constant counts;
            # the arrays hold raw 8-byte values either way.)
            step = second // 300
            good, total = (900 + step % 97, 1000 + step % 89) if varied else (99, 100)
            ring.add_many((T0 - int(window_s) + second) // evaluator.bucket_s, good, total)
    evaluator.closed_until_s = T0
    timings = []
    for k in range(1, closes + 1):
        started = time.perf_counter()
        evaluator.close(T0 + k * PUSH_S)
        timings.append(time.perf_counter() - started)
    return evaluator, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", type=int, default=100)
    parser.add_argument("--window", default="30d")
    parser.add_argument("--closes", type=int, default=360)
    options = parser.parse_args()
    objectives = parse_manifest(manifest(options.objectives, options.window))
    window_s = parse_duration(options.window)

    # First without tracemalloc (it slows every allocation and inflates RSS): timings, RSS.
    rss_before = resident_bytes()
    evaluator, timings = build(objectives, window_s, options.closes)
    rss_grew = resident_bytes() - rss_before
    # Then the same again, counting the Python allocations the evaluator holds.
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held_evaluator, _ = build(objectives, window_s, options.closes, varied=False)
    after = tracemalloc.take_snapshot()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    tracemalloc.stop()
    del held_evaluator

    started = time.perf_counter()
    state = json.dumps(evaluator.export_state(T0 + options.closes * PUSH_S), separators=(",", ":"))
    save_s = time.perf_counter() - started
    print(
        f"slo windows: {options.objectives} objectives x {options.window}: "
        f"{held / options.objectives / 1024:.0f} kB per objective (tracemalloc), "
        f"RSS +{rss_grew / 2**20:.0f} MB for all; "
        f"close of one {PUSH_S}s interval for all: median {statistics.median(timings) * 1000:.1f} ms, "
        f"worst {max(timings) * 1000:.1f} ms; state save {len(state) / 1024:.0f} kB JSON in {save_s * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
