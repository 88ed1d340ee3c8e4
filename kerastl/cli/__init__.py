"""The `kerastl` command: a thin shell over the library (`kerastl.cli.main.main(argv)`)."""
