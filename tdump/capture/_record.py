"""Zero-code-change capture: find the model and the loss in an unmodified script.

:class:`AutoCapture` installs global module hooks and a global optimizer step hook.
The model is found by this rule (docs/capture.md, "How `tdump record` finds the model"):

* calls made while torch.fx traces (``symbolic_trace``, ``tdump.load``) are ignored;
* the first top-level call of a module with trainable parameters is a provisional
  pick (wrappers unwrapped); a later top-level call of a module that contains it, or
  that has more parameters, replaces it (a submodule called alone before the model);
* at the first optimizer step the pick must own parameters that optimizer updates,
  else the largest other top-level module that does is taken;
* until then nothing is written (records are held in memory), so a wrong
  provisional pick leaves no trace in the store.

The first top-level call of a ``torch.nn`` loss module is the loss; train steps are
counted from optimizer steps; gradients are divided by the scale of the
``GradScaler`` that scales a loss (``GradScaler.scale`` is wrapped while the script
runs). Once the first optimizer step is seen the global module hooks are removed, so
later steps cost what an explicit :class:`~tdump.capture.Hook` costs. A :class:`Hook`
that the script creates itself takes precedence: auto capture then steps aside.

Examples
--------
>>> from tdump.capture import HookConfig
>>> run_script("train.py", ["--epochs", "1"], HookConfig(out="dump.zarr"))  # doctest: +SKIP
0
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from tdump.capture._amp import ScalerWatch
from tdump.capture._config import ALWAYS_ON, HookConfig
from tdump.capture._exit import (
    Terminated,
    TrainingStopped,
    in_forked_child,
    install_sigterm,
    mark_exiting,
)
from tdump.capture._hook import Hook, active_hooks
from tdump.capture._model import fx_tracing, param_count, unwrap
from tdump.capture._out import local_path, resolve_rank
from tdump.capture._script import (
    check_module,
    check_script,
    import_folder,
    print_script_traceback,
)
from tdump.errors import TdumpError, first_line

if TYPE_CHECKING:
    import numpy as np

    from tdump._format import StoreReader

__all__ = ["AutoCapture", "dump_size", "run_script", "summarize"]

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
    announce
        Print the one line naming the captured model and loss (``tdump record`` does).
    """

    def __init__(self, config: HookConfig, *, announce: bool = True) -> None:
        self.config = config.replace(step_source="optimizer")
        self._scaler: Any = None  # the script's GradScaler, once it scales a loss
        self.hook = self._new_hook()
        self.announce = announce
        self._depth = 0
        self._hinted = False
        self._loss: nn.Module | None = None
        # modules called at top level that were not picked: weak, for the optimizer check
        self._others: list[weakref.ReferenceType[nn.Module]] = []
        self._module_handles: list[Any] = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post, always_call=True),
        ]
        self._opt_handle: Any = register_optimizer_step_post_hook(self._opt_step)
        self._scaler_watch: ScalerWatch | None = ScalerWatch(self._saw_scaler)
        self.active = True
        self.confirmed = False
        _AUTOS.add(self)

    def _new_hook(self) -> Hook:
        hook = Hook.from_config(self.config, _auto=True)
        hook.hold()  # nothing is written until the pick is confirmed
        if self._scaler is not None:
            hook.register_scaler(self._scaler)
        return hook

    def _saw_scaler(self, scaler: Any) -> None:
        # called from GradScaler.scale (so ``scaler`` is one) on every iteration: cheap
        if scaler is not self._scaler and self.active:
            self._scaler = scaler
            self.hook.register_scaler(scaler)

    # -- the pick
    def _pick(self, root: nn.Module, called: nn.Module | None, args: tuple[Any, ...] = ()) -> None:
        """(Re-)pick ``root`` as the model; ``called`` is the module being called now, if any."""
        hook = self.hook
        if hook._root is not None:  # a larger module that holds the current pick
            hook.discard()
            hook = self.hook = self._new_hook()
        try:
            hook.register_module(root)  # SelectionError propagates: a user error
        except TdumpError:
            self.step_aside()
            raise
        if self._loss is not None:
            hook.register_loss(self._loss)
        if root is called:  # its own pre-hook missed this call: run it by hand
            hook._guard(hook._root_pre)(called, args)

    def _confirm(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The first optimizer step: settle on the model whose parameters it updates."""
        self.confirmed = True
        hook = self.hook
        if optimizer is not None and hook._root is not None:
            updated = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not _overlaps(hook._root, updated):
                others = [m for m in (r() for r in self._others) if m is not None]
                fits = [m for m in others if _overlaps(m, updated)]
                if fits:
                    best = max(fits, key=param_count)  # the outermost one
                    self._pick(best, None)  # this step's forward is missed
                    hook = self.hook
        self._others.clear()
        try:
            hook.check_existing()
        except TdumpError:
            hook.discard()
            raise
        hook.release()
        if self.announce and hook._root is not None:
            print(self.describe(), file=sys.stderr, flush=True)

    def describe(self) -> str:
        """One line: which module (class, parameter count) and which loss are captured."""
        root = self.hook._root
        if root is None:
            return "tdump: no trained module seen yet"
        loss = self.hook._loss
        loss_text = type(loss).__name__ if loss is not None else "none seen (a functional loss?)"
        line = (
            f"tdump: capturing {type(root).__name__} ({param_count(root):,} parameters), "
            f"loss {loss_text}, to {self.config.out}"
        )
        if self.hook.preactivations:
            line += (
                f"\ntdump: {type(root).__name__} has no activation modules (F.relu and the like "
                "are functions), so the conv and norm outputs are recorded instead: "
                "ranking scores those pre-activations"
            )
        added = self.hook.added
        if added:
            more = f" and {len(added) - 3} more" if len(added) > 3 else ""
            line += (
                f"\ntdump: {len(added)} layer(s) reach no activation module alone, so ranking "
                f"scores their pre-activations, recorded too: {', '.join(added[:3])}{more}"
            )
        return line

    # -- global hooks
    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        depth = self._depth
        self._depth += 1
        if depth != 0 or not self.active or fx_tracing():
            return
        if active_hooks(explicit_only=True):
            self.step_aside()
            return
        hook = self.hook
        if _is_loss(module):
            if self._loss is None and hook._root is not None:
                self._loss = module
                hook.register_loss(module)
            return
        if not _trainable(module) or isinstance(module, parametrize.ParametrizationList):
            return  # the latter computes a weight (weight_norm) when ``conv.weight`` is read
        root = unwrap(module)
        if hook._root is None:
            self._pick(root, module, args)
        elif root is not hook._root and not self.confirmed:
            current = hook._root
            if any(m is current for m in root.modules()) or param_count(root) > param_count(
                current
            ):
                # the model after one of its parts alone, or after a smaller decoy
                self._others.append(weakref.ref(current))
                self._pick(root, module, args)
            elif not any(r() is root for r in self._others):
                self._others.append(weakref.ref(root))

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _opt_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if not self.active or self.hook._root is None:
            return
        if active_hooks(explicit_only=True):
            self.step_aside()
            return
        if not self.confirmed:
            self._confirm(optimizer)
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

    def _remove_global_hooks(self) -> None:
        self._remove_module_hooks()
        self._opt_handle.remove()
        if self._scaler_watch is not None:
            self._scaler_watch.remove()
            self._scaler_watch = None

    def step_aside(self) -> None:
        """Stop auto capture (an explicit Hook is in charge)."""
        if not self.active:
            return
        self.active = False
        self._remove_global_hooks()
        if self.confirmed:
            self.hook.close()
        else:
            self.hook.discard()  # nothing of ours was written

    def close(self) -> None:
        """Remove all global hooks and flush the dump."""
        was_active = self.active
        self.active = False
        self._remove_global_hooks()
        if was_active and not self.confirmed and self.hook._root is not None:
            self._confirm(None)  # no optimizer step at all (an eval-only script)
        self.hook.close()


_AUTOS: weakref.WeakSet[AutoCapture] = weakref.WeakSet()


def _leave_in_child() -> None:
    # a forked child (a DataLoader worker) picks no model: its hook copy is off too
    for auto in list(_AUTOS):
        auto.active = False
        auto._remove_global_hooks()


in_forked_child(_leave_in_child)


def _overlaps(module: nn.Module, param_ids: set[int]) -> bool:
    return any(id(p) in param_ids for p in module.parameters())


def run_script(script: str, args: list[str], config: HookConfig, *, module: bool = False) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` under :class:`AutoCapture`.

    With ``module=True``, ``script`` names a module that runs as ``python -m script``
    would run it (from the current folder). Returns the script's exit code: 130 after
    SIGINT, 143 after SIGTERM (queued records are committed first), 75 when a stop
    request ended training. Bad paths, and a file that is not a Python script, are
    refused before the script starts.
    """
    if module:
        path, label = check_module(script), script
    else:
        check_script(script)  # a checkpoint given as the script: one line, not runpy's traceback
        path, label = script, os.path.basename(script)
    if args and args[0] == "--":
        args = args[1:]
    elif "--" in args:
        args = [a for i, a in enumerate(args) if not (a == "--" and "--" not in args[:i])]
    auto = AutoCapture(config)
    restore = install_sigterm()
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [path, *args]
    sys.path.insert(0, import_folder(script, module=module))
    code = 0
    failed: str | None = None  # how the script failed, for the last line
    try:
        if module:
            runpy.run_module(script, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except KeyboardInterrupt:
        mark_exiting()
        print("tdump: interrupted (SIGINT): committing queued records", file=sys.stderr)
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        if code and not isinstance(exc, (TrainingStopped, Terminated)):
            failed = f"exited with status {code}"
    except TdumpError:
        raise  # tdump.load & co. in the script: one line, as the CLI prints them
    except Exception as exc:  # the script's crash: its traceback, then what was recorded
        print_script_traceback(exc, path)
        code = 1
        said = f": {first_line(exc, 160)}" if str(exc).strip() else ""
        failed = f"failed ({type(exc).__name__}{said})"
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
        try:
            auto.close()
        finally:
            restore()
    hook = auto.hook
    counts = hook.writer.committed
    if counts:
        summary = ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
        print(f"tdump: recorded {summary} record(s) to {config.out}", file=sys.stderr)
        # after a crash, advice on the save interval would point away from the cause
        for line in summarize(config.out, resolve_rank(config)[0], warn=failed is None):
            print(line, file=sys.stderr)
    elif hook._root is None:
        print("tdump: no trained module was seen; nothing recorded", file=sys.stderr)
    if failed is not None:  # last, where `tail` shows it: not a tdump line above the cause
        kept = f"{config.out} keeps the records committed before it" if counts else "no records"
        print(f"tdump: {label} {failed}; {kept}", file=sys.stderr)
    return code


def dump_size(out: str) -> int:
    """Bytes the dump at ``out`` takes (committed files; ``*.partial`` left out)."""
    local = local_path(out)
    if local is not None:
        total = 0
        for folder, _, files in os.walk(local):
            for name in files:
                if not name.endswith(".partial"):
                    with contextlib.suppress(FileNotFoundError):  # renamed while we walked
                        total += os.stat(os.path.join(folder, name)).st_size
        return total
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    return int(fs.du(root))


def summarize(out: str, rank: int = 0, *, warn: bool = True) -> list[str]:
    """Lines for the end of ``tdump record``: saved steps, size, a warning for one step.

    The one-step warning (left out when ``warn`` is false) counts the steps that hold
    the model's tensors (activations, gradients, weights: what ranking reads), not every
    record: losses saved every step (``tdump loop`` does) would otherwise hide a dump
    whose tensors are at step 0.

    >>> summarize("memory://doc/none.zarr")
    []
    """
    from tdump._format import StoreReader

    try:
        reader = StoreReader(out)
        train = reader.steps("train", rank) if rank in reader.ranks() else None
        size = dump_size(out)
        tensors = _tensor_steps(reader, rank, train) if train is not None else None
    except (TdumpError, OSError):
        return []
    if train is None or tensors is None:
        return []
    held = f"{len(train)} saved train step(s)"
    if len(tensors) != len(train):
        held += f", {len(tensors)} of them with the model's tensors (the others: losses or scalars only)"
    lines = [f"tdump: {out} holds {held}, {size / 1e6:.1f} MB"]
    if len(tensors) == 1 and warn:
        only = "only one saved train step" + (
            "" if len(train) == 1 else " with the model's tensors"
        )
        step = int(tensors[0])
        # only train step 0 is the untrained model; an appended or save_steps run's is not
        untrained = " (at step 0: untrained)" if step == 0 else ""
        lines.append(
            f"tdump: warning: {only} (step {step}), so ranking sees the model at that one "
            f"step{untrained}; save more steps with a smaller --interval (e.g. --interval 10) "
            "or --config '{\"save_steps\": [...]}'"
        )
    return lines


def _tensor_steps(reader: StoreReader, rank: int, steps: np.ndarray) -> list[int]:
    """The train steps at which a tensor other than the losses and scalars was saved."""
    n = len(steps)
    held: set[int] = set()
    for name in reader.tensor_names("train", rank):
        if reader.tensor_attrs("train", name, rank).get("collection") in ALWAYS_ON:
            continue  # tiny, often saved every step; ranking reads none of them
        held.update(int(i) for i in reader.saved_records("train", name, rank, committed=n))
        if len(held) == n:
            break  # every step already holds tensors
    return sorted(int(steps[i]) for i in held)
