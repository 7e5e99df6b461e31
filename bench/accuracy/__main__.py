"""``python -m bench.accuracy [--quick] [--resume] ...``: run the accuracy study."""

from .cli import main

raise SystemExit(main())
