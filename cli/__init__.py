"""The ``fedrec`` command (``fedrec.cli.main``): one typer app; each command's module registers
it. Command modules parse options and print; the work is in the packages they call."""
