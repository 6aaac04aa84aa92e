"""Tests for klock_async.logging: the library is silent unless the application set logging up."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# 1,000 acquire+release pairs, a Wait-Die death, a stale write and a lost lease: every kind of
# event the library can log, at INFO and at WARNING.
_PROGRAM = textwrap.dedent(
    """
    import anyio
    {setup}
    from klock_async import CausalViolationError, Klock, LeaseDied, LeaseLostError

    async def main() -> None:
        async with Klock() as klock:
            old = await klock.register_agent("old")
            young = await klock.register_agent("young")
            for _ in range(1000):
                await (await young.acquire("/f", "MUTATES")).release()
            held = await old.acquire("/g", "MUTATES")
            try:
                await young.acquire("/g", "MUTATES", wait=False)
            except LeaseDied:
                pass
            await held.release()
            await young.read("/h")
            await old.write("/h")
            try:
                await young.write("/h")
            except CausalViolationError:
                pass
            try:
                async with young.lease("/i", "MUTATES") as lease:
                    await klock.revoke(lease.id)
            except LeaseLostError:
                pass

    anyio.run(main)
    """
)


def _run(setup: str) -> subprocess.CompletedProcess[str]:
    code = _PROGRAM.format(setup=setup)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )


def test_an_unconfigured_program_sees_nothing() -> None:
    """Without logging set up, 1,000 pairs, a death and a stale write print nothing at all."""
    result = _run("")
    assert (result.stdout, result.stderr) == ("", "")


def test_stdlib_logging_turns_the_events_on() -> None:
    """An application's logging.basicConfig(level=INFO) receives the kernel's events."""
    result = _run("import logging; logging.basicConfig(level=logging.INFO)")
    assert result.stdout == ""
    assert result.stderr.count("lease.granted") == 1002
    assert "request.died" in result.stderr
    assert "write.refused" in result.stderr
    assert "lease.lost" in result.stderr


def test_stdlib_warning_level_keeps_only_warnings() -> None:
    """At WARNING, stdlib logging gets the stale write and the lost lease, no lease events."""
    result = _run("import logging; logging.basicConfig(level=logging.WARNING)")
    assert "lease.granted" not in result.stderr
    assert "write.refused" in result.stderr
    assert "lease.lost" in result.stderr


def test_configure_sends_the_events_to_stderr() -> None:
    """klock_async.logging.configure("info") shows every event on stderr, none on stdout."""
    result = _run("from klock_async.logging import configure; configure('info')")
    assert result.stdout == ""
    assert result.stderr.count("lease.granted") == 1002
    assert "agent.registered" in result.stderr
