"""Quick start: three agents, leases, Wait-Die, a queue and the tool decorator.

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
        planner = await klock.register_agent("planner")
        coder = await klock.register_agent("coder")
        reviewer = await klock.register_agent("reviewer")

        async with planner.lease("FILE:/src/auth.js", "MUTATES", ttl=30) as lease:
            print(f"planner holds {lease.resource} with fencing token {lease.token}")
            try:
                async with coder.session() as edit:  # a unit of work, younger than the lease
                    await edit.acquire("src/app.js", "MUTATES")
                    await edit.acquire("src/auth.js", "MUTATES")  # holds a file: dies
            except LeaseDied as died:
                print(f"coder died: blocked by {died.blocker_agent_id!r}; app.js released")
            async with anyio.create_task_group() as tg:

                async def review() -> None:
                    # Holds nothing: queues instead of dying, granted by the planner's release.
                    got = await reviewer.acquire("src/auth.js", "CONSUMES")  # bare path = FILE
                    print(f"reviewer got {got.resource} with token {got.token}")
                    await got.release()

                tg.start_soon(review)
                await anyio.lowlevel.checkpoint()  # one loop turn: the reviewer's request queues
                waiting = (await klock.statistics()).requests_waiting
                print(f"{waiting} request waiting")
                await lease.release()  # hands the file to the reviewer in the same step

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
