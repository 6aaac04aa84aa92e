"""The public API is what ``klock_async/__init__.py`` exports."""

from __future__ import annotations

import klock_async


def test_all_is_sorted() -> None:
    """``__all__`` is sorted, so additions land in one obvious place."""
    assert klock_async.__all__ == sorted(klock_async.__all__)


def test_all_is_complete() -> None:
    """Every public name defined in the package namespace is listed in ``__all__``."""
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
