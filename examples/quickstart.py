"""Quick start: two agents, one file, leases, Wait-Die and the tool decorator.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

from klock_async import Klock, LeaseDied
from klock_async.logging import configure


async def main() -> None:
    configure("warning")  # keep the lease events quiet; "info" shows every grant and release
    files: dict[str, str] = {"/src/auth.js": ""}

    async with Klock() as klock:  # starts the scheduler actor
        older = await klock.register_agent("planner")  # age = registration order
        younger = await klock.register_agent("coder")

        async with younger.lease("FILE:/src/auth.js", "MUTATES", ttl=30) as lease:
            print(f"coder holds {lease.resource} with fencing token {lease.token}")
            newest = await klock.register_agent("reviewer")
            try:
                await newest.acquire("src/auth.js", "CONSUMES")
            except LeaseDied as died:
                print(f"reviewer died: blocked by {died.blocker_agent_id!r}")

        lease = await older.acquire("src/auth.js", "MUTATES")  # bare path = FILE, normalised
        print(f"planner got {lease.resource} with token {lease.token}")
        await lease.release()

        @klock.protected(agent="coder", resource=lambda path, **_: path, predicate="MUTATES")
        async def append_line(path: str, line: str) -> None:
            text = files[path]  # read ...
            await anyio.lowlevel.checkpoint()  # ... think (another call may run here) ...
            files[path] = text + line + "\n"  # ... write

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(append_line, "/src/auth.js", f"edit {i}")
        kept = files["/src/auth.js"].count("edit")
        print(f"20 concurrent read-modify-write tool calls, {kept} edits kept")
        assert kept == 20


if __name__ == "__main__":
    anyio.run(main)
