"""``python -m tdump`` = the ``tdump`` command (how the loop starts its stages)."""

from tdump.cli.app import main

main()
