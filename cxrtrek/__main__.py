"""``python -m cxrtrek``: the command line."""

from cxrtrek.agent.cli import main

raise SystemExit(main())
