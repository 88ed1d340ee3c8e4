"""`python -m kerastl ...` runs the `kerastl` command."""

from kerastl.cli.main import entry_point

entry_point()
