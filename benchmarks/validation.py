"""Cost of the request checks of ``klock serve`` (klock_async.validation), per body.

Prints one table, every figure from this one run: the time to turn a raw body into a checked
dict with what the server did before the validation layer (``json.loads`` and an object
check) and with :func:`klock_async.validation.parse_body` (media type, depth, text, integer
range and unknown-field checks), for the bodies of the hot endpoints, and their ratio. The
fields of each body are read by the same code either way, so they are not timed.

Run from the repository root::

    python benchmarks/validation.py            # about 10 seconds
    python benchmarks/validation.py --quick    # a fraction of a second (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import timeit
from typing import Any

from klock_async import validation

_BODIES: dict[str, dict[str, Any]] = {
    "POST /agents": {"agent_id": "refactor-bot", "priority": 100},
    "POST /leases": {
        "agent_id": "refactor-bot",
        "session_id": "session-1",
        "resource_type": "FILE",
        "resource_path": "/src/auth.ts",
        "predicate": "MUTATES",
        "ttl": 60000,
    },
    "POST /intents": {
        "agent_id": "refactor-bot",
        "session_id": "4f1c0e6a2b8d4c6e9f0a1b2c3d4e5f60",
        "intents": [{"resource": "FILE:/src/auth.ts", "predicate": "MUTATES"}],
        "ttl": 30000.0,
        "wait": True,
        "timeout_ms": None,
        "isolation": "READ_COMMITTED",
    },
    "POST /clocks/write": {"path": "src/auth.ts", "agent_id": "refactor-bot", "strict": True},
}


def _before(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


def _measure(number: int, repeat: int) -> list[tuple[str, float, float]]:
    rows = []
    for route, body in _BODIES.items():
        raw = json.dumps(body).encode()
        declared = validation.BODIES[route]
        assert validation.parse_body(raw, "application/json", declared) == _before(raw)
        before = min(timeit.repeat(lambda raw=raw: _before(raw), number=number, repeat=repeat))

        def after(raw: bytes = raw, declared: validation.Body = declared) -> None:
            validation.parse_body(raw, "application/json", declared)

        checked = min(timeit.repeat(after, number=number, repeat=repeat))
        rows.append((route, before / number * 1e6, checked / number * 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    args = parser.parse_args()
    number, repeat = (200, 2) if args.quick else (20_000, 7)
    rows = _measure(number, repeat)
    print(f"Python {platform.python_version()} on {platform.machine()}, {sys.platform}")
    print(f"best of {repeat} runs of {number} bodies each")
    print()
    print(f"| {'body':<18} | {'json.loads only':>16} | {'checked':>10} | {'ratio':>6} |")
    print(f"|{'-' * 20}|{'-' * 18}|{'-' * 12}|{'-' * 8}|")
    for route, before, checked in rows:
        print(
            f"| {route:<18} | {before:>13.2f} us | {checked:>7.2f} us | {checked / before:>6.2f} |"
        )


if __name__ == "__main__":
    main()
