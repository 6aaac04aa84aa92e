"""What :func:`klock_async.shell.write_targets` finds a shell command writes."""

from __future__ import annotations

import pytest

from klock_async.shell import ShellWrites, write_targets

CWD = "/repo"


@pytest.mark.parametrize(
    ("command", "paths"),
    [
        pytest.param("echo hi > a.txt", ["/repo/a.txt"], id="redirect"),
        pytest.param("echo hi >> log/a.txt", ["/repo/log/a.txt"], id="append"),
        pytest.param("make &> build.log", ["/repo/build.log"], id="both-streams"),
        pytest.param("cmd 2> /logs/err 2>&1", ["/logs/err"], id="stderr-and-dup"),
        pytest.param("cat <<EOF > b.txt\nx\nEOF\n", ["/repo/b.txt"], id="heredoc-to-file"),
        pytest.param("cat > o <<'X'\ny\nX\n", ["/repo/o"], id="file-then-heredoc"),
        pytest.param("tee -a d.txt e.txt < x", ["/repo/d.txt", "/repo/e.txt"], id="tee"),
        pytest.param("sed -i 's/a/b/' c.txt", ["/repo/c.txt"], id="sed-in-place"),
        pytest.param(
            "sed -i.bak -e s/a/b/ c.txt d.txt", ["/repo/c.txt", "/repo/d.txt"], id="sed-e"
        ),
        pytest.param("sed 's/a/b/' c.txt", [], id="sed-not-in-place"),
        pytest.param("mv -f g sub/h", ["/repo/g", "/repo/sub/h"], id="mv"),
        pytest.param("cp -r e f", ["/repo/f"], id="cp-destination"),
        pytest.param("rm -f i j", ["/repo/i", "/repo/j"], id="rm"),
        pytest.param("touch -d now k", ["/repo/k"], id="touch-with-value"),
        pytest.param("ls | wc -l > n && git add n", ["/repo/n"], id="pipeline-list"),
        pytest.param("(echo x > p) ; echo $(echo y > q)", ["/repo/p", "/repo/q"], id="nested"),
        pytest.param("echo > a/./b/../c 2>/dev/null", ["/repo/a/c"], id="normalised"),
        pytest.param("echo 'm n' > 'm n'", ["/repo/m n"], id="quoted"),
        pytest.param("git status; grep -r x .", [], id="writes-nothing"),
    ],
)
def test_write_targets(command: str, paths: list[str]) -> None:
    """Each writing construct names its files, absolute and normalised."""
    assert write_targets(command, CWD) == ShellWrites(tuple(paths), (), parsed=True)


@pytest.mark.parametrize(
    ("command", "unresolved"),
    [
        pytest.param('echo x > "$HOME/l"', ['"$HOME/l"'], id="expansion"),
        pytest.param("echo x > $(mktemp)", ["$(mktemp)"], id="command-substitution"),
        pytest.param("cat x > *.txt", ["*.txt"], id="glob"),
        pytest.param("echo > ~/notes", ["~/notes"], id="tilde"),
        pytest.param("cd sub && echo > n", ["n"], id="relative-after-cd"),
    ],
)
def test_unresolved_targets(command: str, unresolved: list[str]) -> None:
    """A target that depends on the run is reported, not guessed."""
    writes = write_targets(command, CWD)
    assert writes.parsed and writes.paths == () and list(writes.unresolved) == unresolved


def test_absolute_target_after_cd_is_still_known() -> None:
    """Changing directory does not hide a write to an absolute path."""
    assert write_targets("cd /x && echo > /abs/o", CWD).paths == ("/abs/o",)


def test_command_that_does_not_parse() -> None:
    """Invalid shell gives parsed=False and no targets."""
    assert write_targets("echo ( ", CWD) == ShellWrites((), (), parsed=False)
