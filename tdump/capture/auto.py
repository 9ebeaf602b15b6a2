"""Switch capture on from the environment, for launchers (torchrun, job schedulers).

Set ``TDUMP_CONFIG`` to a JSON/YAML file path, to inline JSON, or to ``1`` (defaults),
then either

* ``python -m tdump.capture.auto train.py ARGS`` (also ``torchrun ... -m tdump.capture.auto train.py ARGS``;
  ``-m mypkg.train ARGS`` in place of ``train.py ARGS`` runs a module as ``python -m`` does), or
* put ``import tdump.capture.auto`` at the top of the script (a no-op when the variable is unset).

Unset keys default as for ``tdump record`` (no ``include_regex``: the seed's selection and
the outputs of activation modules by type, ``include_activations``).
Each DDP rank writes ``rank<R>`` of the same store (rank from torch.distributed, else ``RANK``).

Examples
--------
>>> import os
>>> os.environ.pop("TDUMP_CONFIG", None) and None
>>> install_from_env() is None
True
"""

from __future__ import annotations

import os
import sys

from tdump.capture._config import ENV_VAR, HookConfig, load_config, with_default_selection
from tdump.capture._exit import at_exit, install_sigterm
from tdump.capture._record import AutoCapture, run_script

__all__ = ["config_from_env", "install_from_env"]

_INSTALLED: list[AutoCapture] = []


def config_from_env() -> HookConfig | None:
    """The :class:`HookConfig` that ``TDUMP_CONFIG`` describes, or ``None`` when unset."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw or raw.lower() in ("0", "false", "off"):
        return None
    data = {} if raw.lower() in ("1", "true", "on") else load_config(raw)
    return HookConfig.from_dict(with_default_selection(data))


def install_from_env() -> AutoCapture | None:
    """Start auto capture if ``TDUMP_CONFIG`` is set (once per process); closed at exit."""
    if _INSTALLED:
        return _INSTALLED[0]
    cfg = config_from_env()
    if cfg is None:
        return None
    auto = AutoCapture(cfg)
    _INSTALLED.append(auto)
    at_exit(auto.close)  # before executors shut down: queued records are committed
    install_sigterm()
    return auto


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cfg = config_from_env() or HookConfig.from_dict(with_default_selection({}))
    if argv[0].startswith("-m"):  # -m MODULE or -mMODULE, as python takes
        module, rest = (
            (argv[1], argv[2:]) if argv[0] == "-m" and len(argv) > 1 else (argv[0][2:], argv[1:])
        )
        return run_script(module, rest, cfg, module=True)
    return run_script(argv[0], argv[1:], cfg)


if __name__ == "__main__":
    from tdump.errors import TdumpError

    try:
        sys.exit(_main(sys.argv[1:]))
    except TdumpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
else:
    install_from_env()
