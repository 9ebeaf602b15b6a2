"""``python -m tdump`` = the ``tdump`` command (how the loop starts its stages)."""

if __name__ == "__main__":
    from tdump.cli.app import main

    main()
