"""Latency of the coding-agent hooks: what a tool call of Claude Code pays for klock.

Prints one table, every figure from this one run on this machine, against one ``klock serve``
(no journal) started in another process on 127.0.0.1:

(a) floor: ``python -c pass`` (interpreter start and exit, no klock);
(b) ``python -c "import klock_async"`` (the package loads its names lazily);
(c) ``python -c "import http.client"`` (why the command hook speaks HTTP over a raw socket);
(d) command hook, uncontended: ``klock hook claude-code`` with a PreToolUse Edit of a file
    nobody holds on stdin (process start, one round trip, exit), as Claude Code runs it;
(e) HTTP hook, uncontended: ``POST /hooks/claude-code`` with the same event, from a client
    that keeps its connection open (as an HTTP hook does), one request at a time;
(f) HTTP hook, PostToolUse of that edit (the write is recorded, the hold pushed);
(g) as (e) while other sessions hold 1,000 files (the hooks remember each session's leases
    instead of reading a snapshot of all of them, so this should match (e)).

In (e) to (g) the session ends (SessionEnd, not timed) every 20 edits, so it holds at most 20
files, as a session whose edits are spread over a minute would.

Each row is the median and the 95th percentile of its calls. Targets: (d) <= 100 ms,
(e) <= 5 ms. The load average printed with the table tells how busy the machine was.

Run from the repository root::

    python benchmarks/hooks.py            # full run, about 30 seconds
    python benchmarks/hooks.py --quick    # a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _serving import klock_serve

TARGETS = {"d": 100.0, "e": 5.0}


def event(name: str, session: str, path: Path, cwd: Path) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "session_id": session,
        "transcript_path": str(cwd / "t.jsonl"),
        "cwd": str(cwd),
        "permission_mode": "default",
        "hook_event_name": name,
        "tool_name": "Edit",
        "tool_input": {"file_path": str(path), "old_string": "a", "new_string": "b"},
        "tool_use_id": "toolu_01bench",
    }
    if name == "PostToolUse":
        payload["tool_response"] = {"filePath": str(path), "success": True}
    return payload


def wall(command: list[str], stdin: str | None, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command} exited {result.returncode}: {result.stderr}")
    return elapsed


def hook_command() -> list[str]:
    script = shutil.which("klock", path=str(Path(sys.executable).parent))
    if script is not None:
        return [script, "hook", "claude-code"]
    return [sys.executable, "-m", "klock_async", "hook", "claude-code"]


def processes(n: int, url: str, cwd: Path) -> dict[str, list[float]]:
    env = {**os.environ, "KLOCK_SERVER_URL": url}
    python = [sys.executable, "-c"]
    rows: dict[str, list[float]] = {key: [] for key in "abcd"}
    hook = hook_command()
    session = str(uuid.uuid4())
    for i in range(n):  # interleaved, so a busy moment of the machine hits every row alike
        rows["a"].append(wall([*python, "pass"], None, env))
        rows["b"].append(wall([*python, "import klock_async"], None, env))
        rows["c"].append(wall([*python, "import http.client"], None, env))
        payload = json.dumps(event("PreToolUse", session, cwd / f"cmd{i}.py", cwd))
        rows["d"].append(wall(hook, payload, env))
    return rows


def _call(connection: http.client.HTTPConnection, payload: dict[str, Any]) -> float:
    body = json.dumps(payload)
    started = time.perf_counter()
    connection.request("POST", "/hooks/claude-code", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    elapsed = time.perf_counter() - started
    if response.status != 200 or answer:
        raise RuntimeError(f"unexpected answer {response.status} {answer}")
    return elapsed


def _end(connection: http.client.HTTPConnection, session: str, cwd: Path) -> None:
    payload = {"session_id": session, "cwd": str(cwd), "hook_event_name": "SessionEnd"}
    _call(connection, payload)


def http_calls(n: int, url: str, cwd: Path, rows: dict[str, list[float]], keys: str) -> None:
    connection = http.client.HTTPConnection(url.split("://", 1)[1], timeout=30)
    pre, post = keys[0], keys[1:]
    try:
        session = str(uuid.uuid4())
        for i in range(n):
            path = cwd / f"{pre}{i}.py"
            rows[pre].append(_call(connection, event("PreToolUse", session, path, cwd)))
            elapsed = _call(connection, event("PostToolUse", session, path, cwd))
            if post:
                rows[post].append(elapsed)
            if i % 20 == 19:
                _end(connection, session, cwd)
                session = str(uuid.uuid4())
        _end(connection, session, cwd)
    finally:
        connection.close()


def crowd(url: str, cwd: Path, sessions: int, files: int) -> None:
    """Have ``sessions`` other sessions hold ``files`` files each (kept: never ended)."""
    connection = http.client.HTTPConnection(url.split("://", 1)[1], timeout=30)
    try:
        for s in range(sessions):
            session = str(uuid.uuid4())
            for f in range(files):
                _call(connection, event("PreToolUse", session, cwd / f"crowd{s}-{f}.py", cwd))
    finally:
        connection.close()


LABELS = {
    "a": "(a) floor: python -c pass",
    "b": "(b) python -c 'import klock_async'",
    "c": "(c) python -c 'import http.client'",
    "d": "(d) command hook, PreToolUse Edit",
    "e": "(e) HTTP hook, PreToolUse Edit",
    "f": "(f) HTTP hook, PostToolUse Edit",
    "g": "(g) as (e), 1,000 other files held",
}


def report(rows: dict[str, list[float]]) -> None:
    print(f"{'row':<38}  {'calls':>5}  {'median':>9}  {'p95':>9}  {'target':>8}  verdict")
    print("-" * 84)
    for key, label in LABELS.items():
        samples = sorted(1000 * s for s in rows[key])
        median = statistics.median(samples)
        p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
        target = TARGETS.get(key)
        verdict = "" if target is None else ("PASS" if median <= target else "MISS")
        goal = "" if target is None else f"<= {target:g} ms"
        print(
            f"{label:<38}  {len(samples):>5}  {median:>6.2f} ms  {p95:>6.2f} ms  {goal:>8}  "
            f"{verdict}".rstrip()
        )
    a = statistics.median(rows["a"])
    d = statistics.median(rows["d"])
    print(f"the command hook costs {1000 * (d - a):.1f} ms over a bare interpreter start")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls (smoke test)")
    parser.add_argument("--processes", type=int, default=40, help="calls per process row")
    parser.add_argument("--requests", type=int, default=1000, help="calls per HTTP row")
    args = parser.parse_args()
    n_processes, n_requests = (5, 50) if args.quick else (args.processes, args.requests)
    with tempfile.TemporaryDirectory() as tmp, klock_serve() as server:
        url = server.url
        cwd = Path(tmp)
        rows = processes(n_processes, url, cwd)
        rows.update({"e": [], "f": [], "g": []})
        http_calls(n_requests, url, cwd, rows, "ef")
        crowd(url, cwd, sessions=50, files=20)
        http_calls(n_requests, url, cwd, rows, "g")
    report(rows)


if __name__ == "__main__":
    main()
