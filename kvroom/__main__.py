"""``python -m kvroom``: the ``kvroom`` command."""

from kvroom.cli import main

raise SystemExit(main())
