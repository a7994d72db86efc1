"""Shared helpers for the sandbox tests."""

import os
import time

import pytest


def sandbox_pids():
    """Pids of live processes running under a sandbox uid (>= 1,000,000; root runs only)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            if int(fields["Uid"].split()[0]) >= 1_000_000 and "Z" not in fields["State"]:
                pids.append(int(pid))
        except (OSError, KeyError, ValueError):
            continue
    return pids


@pytest.fixture
def no_leftovers():
    """Fail the test if sandboxed processes outlive it."""
    yield
    if os.geteuid() != 0:
        return
    deadline = time.monotonic() + 2.0
    while sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_pids() == []
