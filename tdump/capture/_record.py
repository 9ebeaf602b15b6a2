"""Zero-code-change capture: find the model and the loss in an unmodified script.

:class:`AutoCapture` installs global module hooks and a global optimizer step hook.
The first top-level module call with trainable parameters is the model (wrappers
unwrapped); the first top-level call of a ``torch.nn`` loss module is the loss; train
steps are counted from optimizer steps. Once the first optimizer step is seen the
global module hooks are removed, so later steps cost what an explicit
:class:`~tdump.capture.Hook` costs. A :class:`Hook` that the script creates itself
takes precedence: auto capture then steps aside.

Examples
--------
>>> from tdump.capture import HookConfig
>>> run_script("train.py", ["--epochs", "1"], HookConfig(out="dump.zarr"))  # doctest: +SKIP
0
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing
from torch.optim.optimizer import register_optimizer_step_post_hook

from tdump.capture._config import HookConfig
from tdump.capture._hook import Hook, active_hooks, check_out_path, log
from tdump.capture._model import unwrap
from tdump.errors import ConfigError

__all__ = ["AutoCapture", "run_script"]

FUNCTIONAL_LOSS_HINT = (
    "tdump: the loss is not an nn.Module (a functional loss such as F.cross_entropy?), so the "
    "loss value and its inputs are not recorded; activations and gradients are. To record them, "
    "add after the loss line: `import tdump.capture; tdump.capture.record_loss(loss, outputs, targets)`"
)


def _is_loss(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.loss._Loss) or type(module).__name__.endswith("Loss")


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class AutoCapture:
    """Capture from whatever model the running process trains (see module docstring).

    Parameters
    ----------
    config
        Hook settings; ``step_source`` is forced to ``"optimizer"``.
    """

    def __init__(self, config: HookConfig) -> None:
        self.hook = Hook.from_config(config.replace(step_source="optimizer"), _auto=True)
        self._depth = 0
        self._hinted = False
        self._module_handles: list[Any] = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        ]
        self._opt_handle: Any = register_optimizer_step_post_hook(self._opt_step)
        self.active = True

    # -- global hooks
    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if is_fx_tracing():  # tdump.load traces the model: those calls are not training
            return
        depth = self._depth
        self._depth += 1
        if depth != 0 or not self.active:
            return
        if active_hooks(explicit_only=True):
            self.step_aside()
            return
        hook = self.hook
        if hook._root is None and not _is_loss(module) and _trainable(module):
            root = unwrap(module)
            hook.register_module(root)  # SelectionError propagates: a user error
            if root is module:  # its own pre-hook missed this call: run it by hand
                hook._guard(hook._root_pre)(module, args)
        elif hook._root is not None and hook._loss is None and _is_loss(module):
            hook.register_loss(module)

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if is_fx_tracing():
            return
        self._depth = max(0, self._depth - 1)

    def _opt_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if not self.active or self.hook._root is None:
            return
        if active_hooks(explicit_only=True):
            self.step_aside()
            return
        self.hook.optimizer_step()
        if self._module_handles:
            if self.hook._loss is None and not self._hinted:
                self._hinted = True
                print(FUNCTIONAL_LOSS_HINT, file=sys.stderr, flush=True)
            self._remove_module_hooks()

    def _remove_module_hooks(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    def step_aside(self) -> None:
        """Stop auto capture (an explicit Hook is in charge)."""
        if not self.active:
            return
        self.active = False
        self._remove_module_hooks()
        self._opt_handle.remove()
        self.hook.close()

    def close(self) -> None:
        """Remove all global hooks and flush the dump."""
        self.active = False
        self._remove_module_hooks()
        self._opt_handle.remove()
        self.hook.close()


def run_script(script: str, args: list[str], config: HookConfig) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` under :class:`AutoCapture`.

    Returns the script's exit code. Bad paths are refused before the script starts.
    """
    if not os.path.isfile(script):
        raise ConfigError(f"no training script at {script}; check the path")
    check_out_path(config.out)
    if args and args[0] == "--":
        args = args[1:]
    elif "--" in args:
        args = [a for i, a in enumerate(args) if not (a == "--" and "--" not in args[:i])]
    auto = AutoCapture(config)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
        auto.close()
    hook = auto.hook
    if hook._root is None and auto.active is False and not active_hooks(explicit_only=True):
        log.warning("tdump: no trained model was seen, nothing recorded")
    counts = hook.writer.committed
    if counts:
        summary = ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
        print(f"tdump: recorded {summary} record(s) to {config.out}", file=sys.stderr)
    elif hook._root is None:
        print("tdump: no trained module was seen; nothing recorded", file=sys.stderr)
    return code
