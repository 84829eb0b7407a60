"""`python -m vitcrs.report`: see vitcrs.report."""

from vitcrs.report import main

raise SystemExit(main())
