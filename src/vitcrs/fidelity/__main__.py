"""`python -m vitcrs.fidelity`: the gradient-fidelity meter (see vitcrs.fidelity.cli)."""

from vitcrs.fidelity.cli import main

main()
