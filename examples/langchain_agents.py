"""LangChain agents sharing a workspace: plain tools lose edits, klock tools keep them all.

No language model and no API key: each "agent" is a script of tool calls (read a file, think,
write it back with one more line), run concurrently with the others through real
langchain-core tools and ``ainvoke``, the way an agent executor calls them.

1. Plain file tools: every write succeeds, and most of the agents' lines vanish.
2. KlockFileToolkit: a write of a file that changed since the agent read it comes back as
   "changed since you read it ... read it again"; the agent re-reads and redoes its line, and
   every line is kept.

Run: python examples/langchain_agents.py
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

from langchain_core.tools import BaseTool, StructuredTool

from klock_async import Klock
from klock_async.integrations.langchain import KlockFileToolkit
from klock_async.logging import configure

AGENTS = ["planner", "coder", "tester", "reviewer"]
ROUNDS = 3
STALE = "changed since you read it"
TOLD: list[str] = []  # the first agent whose write bounced (its answer is shown once)


def plain_tools(root: Path) -> dict[str, BaseTool]:
    """Unprotected read/write tools, as most agent stacks have them."""

    async def read_file(path: str) -> str:
        return await asyncio.to_thread((root / path).read_text, encoding="utf-8")

    async def write_file(path: str, content: str) -> str:
        await asyncio.to_thread((root / path).write_text, content, encoding="utf-8")
        return f"wrote {path}"

    tools = [
        StructuredTool.from_function(coroutine=read_file, description="Read a file."),
        StructuredTool.from_function(coroutine=write_file, description="Write a file."),
    ]
    return {tool.name: tool for tool in tools}


async def scripted_agent(name: str, tools: dict[str, BaseTool], seed: int) -> int:
    """Add ROUNDS lines to CHANGELOG.md: read, think, write. Returns how many writes bounced."""
    rng = random.Random(seed)
    bounced = 0
    for n in range(ROUNDS):
        while True:
            text = await tools["read_file"].ainvoke({"path": "CHANGELOG.md"})
            await asyncio.sleep(rng.uniform(0.001, 0.01))  # the model thinks
            line = f"- {name}: change {n + 1}\n"
            answer = await tools["write_file"].ainvoke(
                {"path": "CHANGELOG.md", "content": text + line}
            )
            if STALE not in answer:
                break
            bounced += 1
            if not TOLD:
                TOLD.append(name)
                print(f"  {name}'s write was refused; the tool answered:\n    {answer}")
    return bounced


async def run(root: Path, tools_for: dict[str, dict[str, BaseTool]]) -> tuple[int, int]:
    (root / "CHANGELOG.md").write_text("# Changelog\n", encoding="utf-8")
    bounced = await asyncio.gather(
        *(scripted_agent(name, tools_for[name], seed) for seed, name in enumerate(AGENTS))
    )
    lines = (root / "CHANGELOG.md").read_text(encoding="utf-8").count("\n- ")
    return lines, sum(bounced)


async def main() -> None:
    configure("error")  # "warning" also logs each refused stale write (write.refused)
    expected = len(AGENTS) * ROUNDS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        print("Without klock: plain tools")
        kept, _ = await run(root, {name: plain_tools(root) for name in AGENTS})
        print(f"  {kept} of {expected} lines kept: {expected - kept} edits silently lost\n")

        print("With klock: KlockFileToolkit")
        async with Klock() as klock:
            toolkits = {name: KlockFileToolkit(klock, name, root) for name in AGENTS}
            tools = {name: {t.name: t for t in tk.get_tools()} for name, tk in toolkits.items()}
            kept, bounced = await run(root, tools)
            print(f"  {bounced} stale writes caught and redone after a re-read")
            print(f"  {kept} of {expected} lines kept")
            assert kept == expected, "klock must keep every edit"
            assert await klock.leases() == []

        print("\n" + (root / "CHANGELOG.md").read_text(encoding="utf-8"), end="")


if __name__ == "__main__":
    asyncio.run(main())
