"""The public API is what ``klock_async/__init__.py`` exports."""

from __future__ import annotations

import subprocess
import sys

import klock_async


def test_all_is_sorted() -> None:
    """``__all__`` is sorted, so additions land in one obvious place."""
    assert klock_async.__all__ == sorted(klock_async.__all__)


def test_all_is_complete() -> None:
    """Every public name defined in the package namespace is listed in ``__all__``."""
    for name in klock_async.__all__:  # names load on first use: load them all
        getattr(klock_async, name)
    public = {
        name
        for name, value in vars(klock_async).items()
        if not name.startswith("_") and not isinstance(value, type(klock_async))
    }
    assert public == set(klock_async.__all__) - {"__version__"}


def test_exported_members_have_docstrings() -> None:
    """Every exported class and function says what it is."""
    for name in klock_async.__all__:
        value = getattr(klock_async, name)
        if callable(value):
            assert value.__doc__, f"{name} has no docstring"


def test_import_loads_no_submodule() -> None:
    """``import klock_async`` loads nothing else: the hook command pays only for what it uses."""
    code = "import sys, klock_async; print(sorted(m for m in sys.modules if 'klock' in m))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "['klock_async']"


def test_unknown_name_is_an_attribute_error() -> None:
    """A name the package does not export raises AttributeError, as for any module."""
    assert not hasattr(klock_async, "NoSuchName")
