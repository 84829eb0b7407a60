"""`python -m vitcrs.bench`."""

from vitcrs.bench.cli import main

raise SystemExit(main())
