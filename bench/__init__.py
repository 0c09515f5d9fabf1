"""Developer tooling of the repository checkout (not part of the installed package): ``python -m bench.cli``."""
