"""``klock hook NAME``: a coding agent's command hook, one round trip to ``klock serve``.

The harness (Claude Code, Gemini CLI) runs this command around every tool call with the event
as JSON on stdin. It forwards the event to ``POST /hooks/NAME?mode=command`` on the server
named by ``--server`` / ``KLOCK_SERVER_URL`` (several replicas separated by commas: the first
that answers, or the leader a follower names; without one, the local server on
``127.0.0.1:--local-port``, started detached when none answers), where
:mod:`klock_async.hooks` decides, and turns the answer into the harness's exit-code contract:

- allowed: exit 0 (stdout: ``{"systemMessage": ...}`` when there is a warning for the user);
- refused: exit 2, the one-sentence reason on stderr (shown to the model);
- klock failed (no server, bad answer, bad input): exit 2 with the reason, never 1, which
  would let the call through; with ``--fail-open``, exit 0 with a warning instead.

It runs on every tool call, so it imports only what it needs: no asyncio, no HTTP library
(``http.client`` alone costs more than the whole call budget to import; a request over a raw
socket is a few lines), and not the rest of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: this runs per tool call
if TYPE_CHECKING:
    from typing import Any

__all__ = ["HARNESS_NAMES", "add_arguments", "post", "run"]

HARNESS_NAMES = ("claude-code", "gemini-cli")
"""The harnesses ``klock hook`` speaks for (the keys of ``klock_async.hooks.HARNESSES``)."""

DEFAULT_LOCAL_PORT = 3100
START_TIMEOUT = 30.0
"""Seconds a local ``klock serve`` started by the hook may take to start (a bound)."""
SLACK = 15.0
"""Seconds the hook gives the server beyond ``--wait`` before it calls the server lost."""


class HookFailure(Exception):
    """klock could not decide: no server, a refused request or an unreadable answer."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``klock hook``."""
    parser.add_argument("harness", choices=HARNESS_NAMES, help="whose hook events these are")
    parser.add_argument(
        "--wait",
        type=float,
        default=None,
        help="seconds an edit waits for a file another session holds, then is refused "
        "(default 30; 0 refuses at once)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=None,
        help="seconds a session keeps a file after its last edit of it (default 60)",
    )
    parser.add_argument(
        "--fail-open",
        action="store_true",
        help="when klock itself fails, allow the call with a warning (default: refuse it)",
    )
    parser.add_argument(
        "--server",
        default=None,
        help="URL of 'klock serve', or the URLs of its replicas separated by commas "
        "(default: $KLOCK_SERVER_URL, else the local one)",
    )
    parser.add_argument(
        "--token", default=None, help="bearer token of the server (default: $KLOCK_TOKEN)"
    )
    parser.add_argument(
        "--local-port",
        type=int,
        default=DEFAULT_LOCAL_PORT,
        help=f"port of the local server used (and started) without a URL (default "
        f"{DEFAULT_LOCAL_PORT})",
    )


def post(url: str, path: str, body: bytes, token: str | None, timeout: float) -> tuple[int, bytes]:
    """POST ``body`` (JSON) to ``url`` + ``path`` over HTTP/1.1; return (status, body).

    Raises:
        HookFailure: not an ``http://`` URL.
        OSError: the connection failed or timed out.
    """
    scheme, _, rest = url.partition("://")
    if scheme != "http" or not rest:
        raise HookFailure(f"the server URL must start with http://, not {url!r}")
    netloc, _, prefix = rest.partition("/")
    if netloc.startswith("["):  # [::1]:3100
        host, _, after = netloc[1:].partition("]")
        port = after[1:] if after.startswith(":") else ""
    else:
        host, _, port = netloc.partition(":")
    lines = [
        f"POST /{prefix.rstrip('/')}{'/' if prefix else ''}{path.lstrip('/')} HTTP/1.1",
        f"Host: {netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((host, int(port or 80)), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    header, _, payload = raw.partition(b"\r\n\r\n")
    status_line, _, fields = header.partition(b"\r\n")
    try:
        status = int(status_line.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise HookFailure(f"the server at {url} answered something that is not HTTP") from None
    if b"transfer-encoding: chunked" in fields.lower():
        payload = _unchunk(payload)
    return status, payload


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


def _query(args: argparse.Namespace) -> str:
    parts = ["mode=command"]
    if args.wait is not None:
        parts.append(f"wait={args.wait!r}")
    if args.hold is not None:
        parts.append(f"hold={args.hold!r}")
    return "&".join(parts)


def _start_local_server(port: int) -> str:
    """Start a detached ``klock serve`` on loopback (as ``klock mcp`` does); return its URL."""
    import subprocess
    import tempfile
    from pathlib import Path

    log_dir = Path(tempfile.gettempdir()) / f"klock-{os.getuid() if hasattr(os, 'getuid') else 0}"
    log_dir.mkdir(mode=0o700, exist_ok=True)
    log_path = log_dir / f"serve-{port}.log"
    command = [sys.executable, "-m", "klock_async", "serve", "--port", str(port)]
    command += ["--log-level", "warning"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # outlive this hook: every session of the machine shares it
        )
    assert process.stdout is not None
    line = process.stdout.readline()  # the ready line, or EOF when it could not start
    process.stdout.close()
    if b"listening on " in line:
        url = line.decode().rsplit("listening on ", 1)[1].strip()
        print(
            f"klock: started a local klock server at {url} (pid {process.pid}, log {log_path})",
            file=sys.stderr,
        )
        return url
    process.wait(START_TIMEOUT)
    return f"http://127.0.0.1:{port}"  # another hook may have won the race to start it


def _named_leader(payload: bytes) -> str | None:
    """The leader a follower's refusal (``not_leader``) names, if any."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    details = body.get("details") if isinstance(body, dict) else None
    leader = details.get("leader") if isinstance(details, dict) else None
    return leader if isinstance(leader, str) and leader.startswith("http://") else None


def _post_to_leader(
    urls: list[str], path: str, event: bytes, token: str | None, timeout: float
) -> tuple[int, bytes]:
    """POST to the first of several replicas that answers, or to the leader a follower names.

    Raises:
        ConnectionRefusedError: none of them accepts connections.
    """
    for url in urls:
        try:
            status, payload = post(url, path, event, token, timeout)
        except ConnectionRefusedError:
            continue
        if status in (307, 503):
            leader = _named_leader(payload)
            if leader is not None:
                return post(leader, path, event, token, timeout)
            if status == 503 and b'"not_leader"' in payload:
                continue  # an election is under way there: ask the next
        return status, payload
    raise ConnectionRefusedError


def _ask(args: argparse.Namespace, event: bytes) -> dict[str, Any]:
    url = args.server or os.environ.get("KLOCK_SERVER_URL") or ""
    urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]  # replicas
    token = args.token or os.environ.get("KLOCK_TOKEN") or None
    wait = 30.0 if args.wait is None else args.wait
    path = f"/hooks/{args.harness}?{_query(args)}"
    timeout = wait + SLACK
    try:
        status, payload = _post_to_leader(
            urls or [f"http://127.0.0.1:{args.local_port}"], path, event, token, timeout
        )
    except ConnectionRefusedError:
        if url:
            raise HookFailure(
                f"no klock server answers at {url}; start it with 'klock serve'"
            ) from None
        started = _start_local_server(args.local_port)
        try:
            status, payload = post(started, path, event, token, timeout)
        except OSError as error:
            raise HookFailure(
                f"the local klock server at {started} did not answer ({error})"
            ) from None
    except OSError as error:
        raise HookFailure(f"the klock server did not answer ({error})") from None
    try:
        body = json.loads(payload)
    except ValueError:
        raise HookFailure(
            f"the klock server answered {status} with a body that is not JSON"
        ) from None
    if not isinstance(body, dict):
        raise HookFailure(f"the klock server answered {status} with unexpected JSON")
    if status != 200 or body.get("success") is not True or not isinstance(body.get("data"), dict):
        raise HookFailure(f"the klock server refused the event: {body.get('error') or status}")
    data: dict[str, Any] = body["data"]
    return data


def run(args: argparse.Namespace) -> int:
    """Answer one hook event from stdin; return the exit status (0 allow, 2 refuse)."""
    try:
        answer = _ask(args, sys.stdin.buffer.read())
    except BaseException as error:  # anything but exit 2 would let the call through
        if isinstance(error, HookFailure):
            message = str(error)
        elif isinstance(error, KeyboardInterrupt):
            message = "interrupted"
        else:
            message = f"internal error {error!r}"
        if args.fail_open:
            warning = f"klock could not check this call ({message}); let through (--fail-open)"
            print(f"klock: {warning}", file=sys.stderr)
            print(json.dumps({"systemMessage": warning}))
            return 0
        print(f"klock could not check this call, so it is blocked: {message}.", file=sys.stderr)
        return 2
    if answer.get("warning"):
        print(json.dumps({"systemMessage": answer["warning"]}))
    if answer.get("allow") is False:
        print(answer.get("reason") or "klock refused this call.", file=sys.stderr)
        return 2
    return 0
