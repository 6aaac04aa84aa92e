"""``klock init claude-code``: install klock's hooks in Claude Code's settings, or remove them.

Merges the hook configuration into ``.claude/settings.json`` of the project (``--project-dir``,
default the current directory) or, with ``--user``, into ``~/.claude/settings.json``:

- PreToolUse on the edit tools, Bash and the read tools; PostToolUse on the edit tools and
  Bash; SessionEnd: each runs ``klock hook claude-code`` (or, with ``--http``, POSTs to
  ``/hooks/claude-code`` on the server, with ``onFailure: "block"`` so that an unreachable
  server blocks the call instead of letting it through);
- idempotent: running it twice changes nothing the second time; ``--remove`` takes exactly
  klock's entries out again (an entry is klock's when its command is ``klock hook claude-code
  ...`` or its URL ends in ``/hooks/claude-code...``);
- every other key of the file keeps its bytes: the file is edited in place, only the value of
  ``"hooks"`` is rewritten (other hooks in it are kept, in their order);
- it prints what it changed, one line per event, or that nothing changed.

A file that is not a JSON object is left alone: the command says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "merge_hooks", "run", "splice_key"]

EDIT_TOOLS = "Edit|MultiEdit|Write|NotebookEdit"
BEFORE_MATCHER = f"{EDIT_TOOLS}|Bash|Read|Grep|Glob"
AFTER_MATCHER = f"{EDIT_TOOLS}|Bash"
DEFAULT_URL = "http://127.0.0.1:3100"
SLACK = 30
"""Seconds of hook timeout beyond ``--wait``: the hook must answer before Claude Code gives up."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``klock init``."""
    parser.add_argument("harness", choices=("claude-code",), help="the coding agent to set up")
    parser.add_argument(
        "--user", action="store_true", help="edit ~/.claude/settings.json instead of the project's"
    )
    parser.add_argument(
        "--project-dir", default=".", help="project whose .claude/settings.json to edit"
    )
    parser.add_argument("--remove", action="store_true", help="take klock's hooks out again")
    parser.add_argument(
        "--http",
        action="store_true",
        help="HTTP hooks to the server instead of command hooks (Claude Code with onFailure)",
    )
    parser.add_argument(
        "--server",
        default=None,
        help=f"server URL for --http (default: $KLOCK_SERVER_URL, else {DEFAULT_URL})",
    )
    parser.add_argument("--wait", type=float, default=None, help="passed to the hook (seconds)")
    parser.add_argument("--hold", type=float, default=None, help="passed to the hook (seconds)")
    parser.add_argument(
        "--fail-open", action="store_true", help="passed to the hook: allow calls when klock fails"
    )


def _ours(hook: Any) -> bool:
    if not isinstance(hook, dict):
        return False
    command = hook.get("command")
    if hook.get("type") == "command" and isinstance(command, str):
        words = command.split()
        return (
            len(words) >= 3
            and words[0].endswith("klock")
            and words[1:3]
            == [
                "hook",
                "claude-code",
            ]
        )
    url = hook.get("url")
    return hook.get("type") == "http" and isinstance(url, str) and "/hooks/claude-code" in url


def _server(urls: str) -> str:
    """The one URL an HTTP hook names: among several replicas, the one that leads now."""
    from klock_async.errors import InvalidRequestError
    from klock_async.failover import first_leader

    try:
        base = first_leader(urls, token=os.environ.get("KLOCK_TOKEN") or None)
    except InvalidRequestError as exc:
        print(f"klock init: --server: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    if "," in urls.strip().strip(","):
        print(
            f"klock init: an HTTP hook names one server; {base} leads now. Without --http, "
            "'klock hook' follows the leader of every URL in KLOCK_SERVER_URL",
            file=sys.stderr,
        )
    return base


def _hook_entry(args: argparse.Namespace) -> dict[str, Any]:
    wait = 30.0 if args.wait is None else args.wait
    timeout = int(wait) + SLACK
    if args.http:
        base = _server(args.server or os.environ.get("KLOCK_SERVER_URL") or DEFAULT_URL)
        query = []
        for name in ("wait", "hold"):
            value = getattr(args, name)
            if value is not None:
                query.append(f"{name}={value:g}")
        if args.fail_open:
            query.append("fail_open=1")
        url = f"{base}/hooks/claude-code" + (f"?{'&'.join(query)}" if query else "")
        entry: dict[str, Any] = {"type": "http", "url": url, "timeout": timeout}
        entry["headers"] = {"Authorization": "Bearer $KLOCK_TOKEN"}
        entry["allowedEnvVars"] = ["KLOCK_TOKEN"]
        if not args.fail_open:
            entry["onFailure"] = "block"
        return entry
    command = "klock hook claude-code"
    for name in ("wait", "hold"):
        value = getattr(args, name)
        if value is not None:
            command += f" --{name} {value:g}"
    if args.fail_open:
        command += " --fail-open"
    return {"type": "command", "command": command, "timeout": timeout}


def merge_hooks(
    hooks: dict[str, Any], entry: dict[str, Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """Return ``hooks`` without klock's entries, plus ``entry`` on klock's events when given.

    Also returns one line per event saying what changed. Other entries keep their order.
    """
    wanted = {}
    if entry is not None:
        wanted = {
            "PreToolUse": {"matcher": BEFORE_MATCHER, "hooks": [entry]},
            "PostToolUse": {"matcher": AFTER_MATCHER, "hooks": [entry]},
            "SessionEnd": {"hooks": [entry]},
        }
    result: dict[str, Any] = {}
    changes = []
    for event in [*hooks, *(e for e in wanted if e not in hooks)]:
        groups = hooks.get(event, [])
        if not isinstance(groups, list):
            result[event] = groups
            continue
        kept = []
        removed = False
        for group in groups:
            inner = group.get("hooks") if isinstance(group, dict) else None
            if not isinstance(inner, list) or not any(_ours(h) for h in inner):
                kept.append(group)
                continue
            removed = True
            others = [h for h in inner if not _ours(h)]
            if others:
                kept.append({**group, "hooks": others})
        if event in wanted:
            kept.append(wanted[event])
        if kept or (event in hooks and not removed):
            result[event] = kept
        if kept != groups:
            verb = "replaced" if removed and event in wanted else "removed" if removed else "added"
            changes.append(f"{event}: {verb} klock's hook")
    return result, changes


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _spans(text: str) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Top-level keys -> (key start, value start, value end); and the closing brace index.

    Raises:
        ValueError: the text is not one JSON object.
    """
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        raise ValueError("not a JSON object")
    i = _skip_ws(text, i + 1)
    spans: dict[str, tuple[int, int, int]] = {}
    if text[i] != "}":
        while True:
            if text[i] != '"':
                raise ValueError(f"expected a key at offset {i}")
            key_start = i
            key, i = decoder.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i] != ":":
                raise ValueError(f"expected ':' at offset {i}")
            i = _skip_ws(text, i + 1)
            _, end = decoder.raw_decode(text, i)
            spans[key] = (key_start, i, end)
            i = _skip_ws(text, end)
            if text[i] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if text[i] == "}":
                break
            raise ValueError(f"expected ',' or '}}' at offset {i}")
    if _skip_ws(text, i + 1) != len(text):
        raise ValueError("text after the JSON object")
    return spans, i


def _indent_of(text: str, index: int) -> str:
    line_start = text.rfind("\n", 0, index) + 1
    prefix = text[line_start:index]
    return prefix if not prefix.strip() else "  "


def _render(value: Any, indent: str) -> str:
    """``value`` as JSON in the file's own style: its indent step, nested under ``indent``."""
    step = len(indent) if indent.strip(" ") == "" and indent else 2
    return json.dumps(value, indent=step).replace("\n", "\n" + indent)


def splice_key(text: str, key: str, value: Any) -> str:
    """Set (or with ``value`` None, delete) one top-level key of a JSON object's text.

    Every other byte of the text stays as it was.

    Raises:
        ValueError: the text is not one JSON object.
    """
    spans, close = _spans(text)
    order = list(spans)
    if key in spans:
        key_start, value_start, value_end = spans[key]
        if value is None:
            index = order.index(key)
            if index > 0:  # from the end of the previous value: takes the comma too
                return text[: spans[order[index - 1]][2]] + text[value_end:]
            if len(order) > 1:
                return text[:key_start] + text[spans[order[1]][0] :]
            return text[:key_start].rstrip() + text[close:].lstrip(" \t")
        indent = _indent_of(text, key_start)
        rendered = _render(value, indent)
        return text[:value_start] + rendered + text[value_end:]
    if value is None:
        return text
    indent = _indent_of(text, spans[order[0]][0]) if order else "  "
    rendered = _render(value, indent)
    member = f'"{key}": {rendered}'
    if order:
        last_end = spans[order[-1]][2]
        return text[:last_end] + f",\n{indent}{member}" + text[last_end:]
    return text[:close].rstrip() + f"\n{indent}{member}\n" + text[close:]


def _settings_path(args: argparse.Namespace) -> Path:
    if args.user:
        return Path.home() / ".claude" / "settings.json"
    return Path(args.project_dir) / ".claude" / "settings.json"


def run(args: argparse.Namespace) -> int:
    """Install (or remove) the hooks; print what changed; return the exit status."""
    path = _settings_path(args)
    existed = path.exists()
    text = path.read_text(encoding="utf-8") if existed else "{}\n"
    try:
        _spans(text)
        settings = json.loads(text)
    except ValueError as error:
        print(f"klock init: {path} is not a JSON object ({error}); fix it first", file=sys.stderr)
        return 2
    hooks = settings.get("hooks", {})
    if not isinstance(hooks, dict):
        print(f"klock init: 'hooks' in {path} is not an object; fix it first", file=sys.stderr)
        return 2
    entry = None if args.remove else _hook_entry(args)
    merged, changes = merge_hooks(hooks, entry)
    if not changes:
        print(f"klock init: {path} already {'has no' if args.remove else 'has'} klock's hooks")
        return 0
    new_text = splice_key(text, "hooks", merged or None)  # no hooks left: no "hooks" key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_text, encoding="utf-8")
    for change in changes:
        print(f"klock init: {path}: {change}")
    return 0
