"""The fuzz suite's shared runner and its end-of-run summary (cases per entry point, crashes,
hangs). See docs/testing.md."""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from driver import COUNTS, FINDINGS, REASONS, Runner


@pytest.fixture(scope="session")
def runner():
    runner = Runner(float(os.environ.get("FOVEAL_FUZZ_TIMEOUT", "10")))
    yield runner
    runner.close()


def pytest_terminal_summary(terminalreporter) -> None:
    if not COUNTS:
        return
    write = terminalreporter.write_line
    write("")
    write(
        "fuzz: cases per entry point (ok = returned, rejected = ValueError/TypeError/"
        "MemoryError, invalid = inputs not built)"
    )
    total: Counter = Counter()
    for label in sorted(COUNTS):
        counts = COUNTS[label]
        total.update(counts)
        detail = " ".join(f"{status}={counts[status]}" for status in sorted(counts))
        write(f"  {label:38s} {sum(counts.values()):6d}  {detail}")
        for reason, count in REASONS[label].most_common(3):
            write(f"      {count:5d} {reason}")
    write(
        f"fuzz: {sum(total.values())} cases, crashes {total['crash']}, hangs {total['hang']}, "
        f"other failures {total['exception'] + total['wrong']}"
    )
    for label, status, detail, path in FINDINGS:
        write(f"fuzz: FINDING {label}: {status}: {detail.strip()[-800:]}")
        write(f"fuzz:   reproducer: python {path}")
