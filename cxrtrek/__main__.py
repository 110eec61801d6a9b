"""``python -m cxrtrek``: the command line."""

from cxrtrek.interfaces.cli import main

raise SystemExit(main())
