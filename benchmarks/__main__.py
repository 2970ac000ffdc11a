"""``python -m benchmarks``: see :mod:`benchmarks` and ``--help``."""

from .runner import main

raise SystemExit(main())
