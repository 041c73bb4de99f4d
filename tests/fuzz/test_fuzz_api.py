"""Property-based fuzzing of every public Python entry point (docs/testing.md).

Each example is a standalone case (cases.py) run in a child process (driver.py); the oracle:
a result of the documented shape and dtype, or ValueError / TypeError / MemoryError. A crash,
a hang, another exception type or a wrong result fails the test, which prints the case as a
standalone reproducer.

Budget: FOVEAL_FUZZ_SECONDS (default 150; scripts/fuzz.sh gives 90) is shared evenly by the entry points; the examples
are derandomized (the same cases every run) unless FOVEAL_FUZZ_SEED is set, which draws new
ones from that seed. ``scripts/fuzz.sh --long`` runs an hour.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, seed, settings

from cases import ENTRY_POINTS
from driver import COUNTS, FAILURES, FINDINGS, REASONS, save_reproducer

BUDGET = float(os.environ.get("FOVEAL_FUZZ_SECONDS", "150"))
PER_ENTRY = BUDGET / len(ENTRY_POINTS)
SEED = os.environ.get("FOVEAL_FUZZ_SEED")
REASONS_ON = os.environ.get("FOVEAL_FUZZ_REASONS") == "1"
# Cases run at tens to hundreds per second; the time budget stops them first. Past the
# budget the remaining examples are drawn but not run (cheap).
MAX_EXAMPLES = max(20, int(PER_ENTRY * 150))


def _settings(function):
    configured = settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )(function)
    return configured if SEED is None else seed(int(SEED))(configured)


def test_oracle_catches_crash_and_hang(runner):
    """The driver reports an abort as a crash, a busy loop as a hang, and carries on."""
    timeout, runner.timeout = runner.timeout, 2.0
    try:
        assert runner.run("", "import os; os.abort()")[0] == "crash"
        assert runner.run("", "while True: pass")[0] == "hang"
        assert runner.run("", "raise SystemError('x')")[0] == "exception"
        assert runner.run("", "raise ValueError('x')")[0] == "rejected"
        assert (
            runner.run(
                "", "foveal.attention(mk((1, 1, 1, 1)), mk((1, 1, 1, 1)), mk((1, 1, 1, 1)))"
            )[0]
            == "ok"
        )
    finally:
        runner.timeout = timeout


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_fuzz(entry, runner):
    started = time.monotonic()
    failures: list[str] = []
    seen: set = set()

    @_settings
    @given(case=ENTRY_POINTS[entry])
    def run(case):
        if time.monotonic() - started > PER_ENTRY:
            return
        label, setup, call = case
        status, detail = runner.run(setup, call)
        COUNTS[label][status] += 1
        if REASONS_ON and status in ("rejected", "invalid"):
            REASONS[label][re.sub(r"-?\\d+", "N", detail)[:110]] += 1
        if status in FAILURES:
            # One report per entry point, status and last line of the detail.
            key = (label, status, detail.strip().splitlines()[-1] if detail.strip() else "")
            if key in seen:
                return
            seen.add(key)
            path = save_reproducer(label, status, setup, call)
            FINDINGS.append((label, status, detail, path))
            failures.append(
                f"{label}: {status}: {detail}\n---- reproducer {path} (after the prelude) ----\n"
                f"{setup}\n{call}"
            )

    run()
    assert not failures, "\n\n".join(failures[:3])
