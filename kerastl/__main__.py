"""`python -m kerastl ...` runs the `kerastl` command."""

from kerastl.cli import entry_point

entry_point()
