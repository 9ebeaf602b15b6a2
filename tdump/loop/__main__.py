"""``python -m tdump.loop checkpoint ...``: the loop's in-process step (see ``_replay``)."""

if __name__ == "__main__":
    from tdump.loop._replay import main

    raise SystemExit(main())
