"""The files a shell command will write, found with a real parser (tree-sitter's bash grammar).

Coding agents also change files through their shell tool (``sed -i``, ``>``, ``tee``, ``cat
<<EOF > file``), where an edit-tool hook never sees them. :func:`write_targets` parses the
command and lists the files it writes, so the hook can lease them like an edit. It is best
effort, and says so: it knows

- redirections that write (``>``, ``>>``, ``>|``, ``&>``, ``&>>``, ``<>``), also on heredocs;
- ``tee``, ``sed -i``, ``mv`` (source and destination), ``cp`` (destination), ``rm``, ``touch``
  and ``truncate``, wherever they appear (pipelines, lists, subshells, ``$(...)``, loops);

and reports as *unresolved* a target it cannot name: one built from an expansion (``$DIR/x``,
``$(...)``, a glob, ``~``), or a relative path in a command that changes directory (``cd``,
``pushd``). Commands run by other programs (``bash -c '...'``, ``python -c``, ``make``) write
what they write unseen. A command that does not parse gives ``parsed=False``.

Needs the ``hooks`` extra (``pip install 'klock-async[hooks]'``: ``tree-sitter`` and
``tree-sitter-bash``); without it, :func:`write_targets` raises ``ImportError``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["ShellWrites", "write_targets"]

_WRITING_REDIRECTS = frozenset({">", ">>", ">|", "&>", "&>>", "<>"})
_CHANGES_DIRECTORY = frozenset({"cd", "pushd", "popd"})
_GLOB = frozenset("*?[")
_NOT_FILES = ("/dev/",)
# command -> its options that take a separate value (the value is not a file it writes)
_VALUE_OPTIONS = {
    "sed": frozenset({"-e", "-f", "-l", "--expression", "--file", "--line-length"}),
    "cp": frozenset({"-S", "-t", "--suffix", "--target-directory"}),
    "mv": frozenset({"-S", "-t", "--suffix", "--target-directory"}),
    "touch": frozenset({"-d", "-r", "-t", "--date", "--reference"}),
    "truncate": frozenset({"-r", "-s", "--reference", "--size"}),
}


@dataclass(frozen=True, slots=True)
class ShellWrites:
    """What a command writes, as far as the parser can tell.

    Attributes:
        paths: absolute, normalised paths of the files it writes, in order, without repeats.
        unresolved: the source text of targets it writes that cannot be named before it runs.
        parsed: False when the command is not valid shell; then both lists are empty.
    """

    paths: tuple[str, ...]
    unresolved: tuple[str, ...]
    parsed: bool


@functools.cache
def _parser() -> Any:
    import tree_sitter
    import tree_sitter_bash

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_bash.language()))


def write_targets(command: str, cwd: str) -> ShellWrites:
    """List the files ``command`` writes when run in directory ``cwd`` (absolute).

    Raises:
        ImportError: the ``hooks`` extra (tree-sitter) is not installed.
    """
    tree = _parser().parse(command.encode())
    root = tree.root_node
    if root.has_error:
        return ShellWrites((), (), parsed=False)
    moves = any(_command_name(node) in _CHANGES_DIRECTORY for node in _walk(root))
    paths: dict[str, None] = {}
    unresolved: dict[str, None] = {}
    for node in _targets(root):
        text = _literal(node)
        if text is None or (moves and not text.startswith("/")):
            unresolved[node.text.decode(errors="replace")] = None
            continue
        path = os.path.normpath(os.path.join(cwd, text))
        if not path.startswith(_NOT_FILES):
            paths[path] = None
    return ShellWrites(tuple(paths), tuple(unresolved), parsed=True)


def _walk(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.named_children))


def _command_name(node: Any) -> str | None:
    if node.type != "command":
        return None
    name = node.child_by_field_name("name")
    return (
        None if name is None else _literal(name.named_children[0] if name.named_children else name)
    )


def _targets(root: Any) -> Iterator[Any]:
    """The nodes naming files written, in source order."""
    for node in _walk(root):
        if node.type == "file_redirect":
            operator = next((c.type for c in node.children if not c.is_named), None)
            destination = node.child_by_field_name("destination")
            if operator in _WRITING_REDIRECTS and destination is not None:
                yield destination
        elif node.type == "command":
            yield from _command_targets(node)


def _command_targets(node: Any) -> list[Any]:
    name = _command_name(node)
    if name is None:
        return []
    name = os.path.basename(name)
    words = list(node.children_by_field_name("argument"))
    options = [_literal(w) or "" for w in words]
    positional = _positional(words, options, _VALUE_OPTIONS.get(name, frozenset()))
    if name in ("tee", "rm", "touch", "truncate", "mv"):
        return positional
    if name == "cp":
        return positional[-1:] if len(positional) >= 2 else []
    if name == "sed" and any(o == "--in-place" or _short_flag(o, "i") for o in options):
        scripted = any(
            o in ("-e", "-f") or o.startswith(("--expression=", "--file=")) for o in options
        )
        return positional if scripted else positional[1:]
    return []


def _short_flag(option: str, flag: str) -> bool:
    return option.startswith("-") and not option.startswith("--") and flag in option[1:2]


def _positional(words: list[Any], options: list[str], with_value: frozenset[str]) -> list[Any]:
    result = []
    ended = False
    skip = False
    for word, text in zip(words, options, strict=True):
        if skip:
            skip = False
            continue
        if not ended and text == "--":
            ended = True
        elif not ended and text.startswith("-") and text != "-":
            skip = text in with_value
        else:
            result.append(word)
    return result


def _literal(node: Any) -> str | None:
    """The text a word stands for, or None when it depends on the run (expansions, globs)."""
    kind = node.type
    if kind == "word":
        text: str = node.text.decode(errors="replace")
        if _GLOB & set(text) or text.startswith("~"):
            return None
        return text.replace("\\", "")
    if kind == "raw_string":
        raw: str = node.text.decode(errors="replace")
        return raw[1:-1]
    if kind == "string":
        parts = node.named_children
        if all(part.type == "string_content" for part in parts):
            return "".join(part.text.decode(errors="replace") for part in parts)
        return None
    if kind == "concatenation":
        pieces = [_literal(part) for part in node.named_children]
        if any(piece is None for piece in pieces):
            return None
        return "".join(piece for piece in pieces if piece is not None)
    return None
