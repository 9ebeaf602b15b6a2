"""Start zarr's I/O event loop where a Ctrl-C cannot break it.

zarr runs every store operation on one event loop in a daemon thread, created by the
first operation of the process (``zarr.core.sync._get_loop``): it stores the new loop,
then starts the thread that runs it. A KeyboardInterrupt between those two steps, in
a training script or a Jupyter cell, leaves a loop that never runs, and every later
zarr call of the process waits on it forever. Python runs signal handlers in the main
thread only, so :func:`start_zarr_loop` has zarr create the loop in a helper thread,
started and awaited with ``_thread``'s C primitives (``threading``'s own Python
locking is not safe against a KeyboardInterrupt either).

Examples
--------
>>> start_zarr_loop()
>>> import zarr.core.sync
>>> zarr.core.sync.loop[0].is_running()
True
"""

from __future__ import annotations

import _thread

__all__ = ["start_zarr_loop"]


def start_zarr_loop() -> None:
    """Have zarr create and start its I/O loop in a helper thread, if it has none yet.

    A Ctrl-C in the main thread meanwhile still raises KeyboardInterrupt there; the
    helper finishes the start either way. A zarr without these internals is left to
    start its loop itself.
    """
    from zarr.core import sync as zsync

    slot, make = getattr(zsync, "loop", None), getattr(zsync, "_get_loop", None)
    if not isinstance(slot, list) or not slot or slot[0] is not None or not callable(make):
        return
    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            make()
        finally:
            done.release()

    _thread.start_new_thread(run, ())
    done.acquire()  # interruptible: a Ctrl-C raises here while the helper goes on
