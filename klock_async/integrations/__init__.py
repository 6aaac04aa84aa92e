"""Integrations with agent frameworks: workspace file tools, LangChain and MCP.

- :mod:`klock_async.integrations.files`: protected file tools on a workspace root (no extra
  dependency); both integrations below are built on them.
- :mod:`klock_async.integrations.langchain`: the ``klock_protected`` decorator and a toolkit of
  protected file tools (``pip install 'klock-async[langchain]'``).
- :mod:`klock_async.integrations.mcp`: the ``klock mcp`` stdio server for coding agents
  (``pip install 'klock-async[mcp]'``).

The optional modules are not imported here, so ``import klock_async.integrations`` works without
any extra installed.
"""

from __future__ import annotations
