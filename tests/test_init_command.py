"""``klock init claude-code``: klock's hooks merged into Claude Code's settings, in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from klock_async.init_command import merge_hooks, splice_key

OTHER_KEYS = (
    '{\n    "model": "opus",\n    "permissions": {"allow": ["Bash(ls)"], "deny": []},\n'
    '    "env": {"NAME": "caf\\u00e9 \u2603"}\n}\n'
)
USER_HOOK = {"matcher": "Bash", "hooks": [{"type": "command", "command": "echo checked"}]}


def _init(
    project: Path, *options: str, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home or project)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "klock_async",
            "init",
            "claude-code",
            "--project-dir",
            str(project),
            *options,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def _settings(project: Path, text: str) -> Path:
    path = project / ".claude" / "settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_init_leaves_other_keys_byte_identical(tmp_path: Path) -> None:
    """Installing adds a "hooks" key after the others; every byte of the others stays."""
    path = _settings(tmp_path, OTHER_KEYS)
    result = _init(tmp_path)
    assert result.returncode == 0, result.stderr
    text = path.read_text(encoding="utf-8")
    end = OTHER_KEYS.rindex("}", 0, OTHER_KEYS.rindex("}"))  # end of the last value
    assert text.startswith(OTHER_KEYS[: end + 1])
    assert text.endswith("\n}\n")
    hooks = json.loads(text)["hooks"]
    assert set(hooks) == {"PreToolUse", "PostToolUse", "SessionEnd"}
    assert hooks["PreToolUse"][0]["hooks"][0]["command"] == "klock hook claude-code"
    assert "PreToolUse: added klock's hook" in result.stdout


def test_init_is_idempotent(tmp_path: Path) -> None:
    """A second run changes nothing and says so."""
    path = _settings(tmp_path, OTHER_KEYS)
    _init(tmp_path)
    first = path.read_bytes()
    again = _init(tmp_path)
    assert again.returncode == 0
    assert path.read_bytes() == first
    assert "already has klock's hooks" in again.stdout


def test_remove_restores_the_file(tmp_path: Path) -> None:
    """``--remove`` after an install gives back the original bytes."""
    path = _settings(tmp_path, OTHER_KEYS)
    _init(tmp_path)
    removed = _init(tmp_path, "--remove")
    assert removed.returncode == 0
    assert path.read_text(encoding="utf-8") == OTHER_KEYS
    assert "removed klock's hook" in removed.stdout


def test_init_keeps_other_hooks_and_the_bytes_around_them(tmp_path: Path) -> None:
    """Hooks of other tools stay, in order; the text before and after "hooks" is unchanged."""
    original = '{"model": "opus",\n  "hooks": ' + json.dumps({"PreToolUse": [USER_HOOK]})
    original += ',\n  "z": 1}'
    path = _settings(tmp_path, original)
    assert _init(tmp_path, "--wait", "5").returncode == 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{"model": "opus",\n  "hooks": ') and text.endswith(',\n  "z": 1}')
    groups = json.loads(text)["hooks"]["PreToolUse"]
    assert groups[0] == USER_HOOK
    assert groups[1]["hooks"][0] == {
        "type": "command",
        "command": "klock hook claude-code --wait 5",
        "timeout": 35,
    }
    assert _init(tmp_path, "--remove").returncode == 0
    assert json.loads(path.read_text(encoding="utf-8"))["hooks"] == {"PreToolUse": [USER_HOOK]}


def test_new_options_replace_the_old_entry(tmp_path: Path) -> None:
    """Installing with other options replaces klock's entry instead of adding a second."""
    path = _settings(tmp_path, "{}")
    _init(tmp_path)
    result = _init(tmp_path, "--hold", "90")
    assert "replaced klock's hook" in result.stdout
    pre = json.loads(path.read_text(encoding="utf-8"))["hooks"]["PreToolUse"]
    assert [h["command"] for g in pre for h in g["hooks"]] == ["klock hook claude-code --hold 90"]


def test_http_hooks_block_when_the_server_fails(tmp_path: Path) -> None:
    """``--http`` installs HTTP hooks that block the call when the server cannot answer."""
    _init(tmp_path, "--http", "--server", "http://127.0.0.1:4100")
    settings = json.loads((tmp_path / ".claude" / "settings.json").read_text(encoding="utf-8"))
    entry = settings["hooks"]["PreToolUse"][0]["hooks"][0]
    assert entry["type"] == "http"
    assert entry["url"] == "http://127.0.0.1:4100/hooks/claude-code"
    assert entry["onFailure"] == "block"


def test_user_scope_edits_the_home_settings(tmp_path: Path) -> None:
    """``--user`` writes ~/.claude/settings.json and not the project's file."""
    home = tmp_path / "home"
    project = tmp_path / "project"
    project.mkdir()
    assert _init(project, "--user", home=home).returncode == 0
    assert (home / ".claude" / "settings.json").exists()
    assert not (project / ".claude").exists()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("[1, 2]", id="not-an-object"),
        pytest.param('{"hooks": []}', id="hooks-not-an-object"),
    ],
)
def test_unreadable_settings_are_left_alone(tmp_path: Path, text: str) -> None:
    """A settings file klock cannot read is not touched; the command exits 2 and says why."""
    path = _settings(tmp_path, text)
    result = _init(tmp_path)
    assert result.returncode == 2
    assert "fix it first" in result.stderr
    assert path.read_text(encoding="utf-8") == text


def test_splice_deletes_a_first_key_cleanly() -> None:
    """Deleting the first of several keys leaves valid JSON with the others' bytes."""
    assert splice_key('{"hooks": {}, "a": 1}', "hooks", None) == '{"a": 1}'
    assert splice_key('{ "hooks": {} }', "hooks", None) == "{}"


def test_merge_without_klock_entries_is_no_change() -> None:
    """Removing from hooks that hold none of klock's entries reports nothing."""
    hooks = {"PreToolUse": [USER_HOOK]}
    assert merge_hooks(hooks, None) == (hooks, [])
