"""``python -m klock_async``: the ``klock`` command line."""

from klock_async.cli import main

raise SystemExit(main())
