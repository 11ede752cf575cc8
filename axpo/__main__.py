"""``python -m axpo``: the same CLI as the ``axpo`` command (what ``axpo run`` starts)."""

from axpo.cli.main import main

raise SystemExit(main())
