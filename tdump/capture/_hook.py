"""The training hook: :class:`Hook`.

Cost model: at a step that is not saved the hook runs one forward pre-hook on the
root module that bumps a counter and returns. At a saved step it attaches forward
hooks to the modules whose outputs are selected (removed again when the forward
ends), registers gradient hooks on those outputs and on the selected parameters,
copies each selected tensor once (clone on the CPU, non-blocking copy into pinned
memory on CUDA) and hands the record to a background writer thread.

Examples
--------
>>> import torch, torchvision
>>> model = torchvision.models.resnet18(num_classes=4)
>>> with Hook("memory://doc/hook.zarr", include_regex=r"layer1\\.0\\.relu", save_interval=1,
...           strict=True) as hook:
...     _ = hook.register_module(model)
...     model(torch.randn(2, 3, 32, 32)).sum().backward()
>>> from tdump._format import StoreReader
>>> StoreReader("memory://doc/hook.zarr").tensor_names("train")
['layer1.0.relu.output_0', 'layer1.0.relu.output_0.grad', 'layer1.0.relu.output_1', 'layer1.0.relu.output_1.grad']
"""

from __future__ import annotations

import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tdump._control import POLL_SECONDS
from tdump.capture._amp import hint_unregistered, require_scaler
from tdump.capture._args import check_module, described, loss_module_for, scalar_value
from tdump.capture._config import CollectionConfig, HookConfig
from tdump.capture._exit import (
    CLOSE_TIMEOUT,
    at_exit,
    exiting,
    in_forked_child,
    install_sigterm,
)
from tdump.capture._guard import Guarded
from tdump.capture._lifecycle import StepLifecycle
from tdump.capture._model import (
    module_tree,
    unwrap,
)
from tdump.capture._out import Existing, module_differences, open_store, prepare_out
from tdump.capture._selection import Selection, by_type, check_selection, computes_a_tensor
from tdump.capture._step import SavedStep
from tdump.capture._writer import BackgroundWriter, PendingRecord
from tdump.errors import ConfigError, TdumpError

__all__ = ["Hook", "active_hooks", "record_loss"]

log = logging.getLogger("tdump.capture")
_HOOKS: weakref.WeakSet[Hook] = weakref.WeakSet()
_STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: Records a provisional (held) hook keeps in memory before it commits to its model.
HOLD_LIMIT = 8


def active_hooks(*, explicit_only: bool = False) -> list[Hook]:
    """Hooks that are registered on a module and not closed."""
    return [
        h
        for h in list(_HOOKS)
        if h._root is not None and not h._closed and not (explicit_only and h._auto)
    ]


def record_loss(loss: torch.Tensor, *inputs: torch.Tensor) -> None:
    """Record a functional loss and its inputs with every active hook (no-op without one).

    The one line to add after ``loss = F.cross_entropy(logits, y)`` is
    ``tdump.capture.record_loss(loss, logits, y)``.
    """
    for h in active_hooks():
        h.record_loss(loss, *inputs)


class Hook(StepLifecycle):
    """Capture regex-selected tensors of a PyTorch model into a tdump store.

    Parameters
    ----------
    out
        Store path or fsspec URL.
    include_regex, save_interval, save_steps, start_step, end_step, **settings
        Any field of :class:`HookConfig` (``collections``, ``compression``,
        ``storage_dtype``, ``reduction``, ``strict``, ``mode``, ...).

    Examples
    --------
    >>> hook = Hook("run.zarr", include_regex=".*relu|.*weight|.*bias|.*running_mean|.*running_var",
    ...             save_interval=100)  # doctest: +SKIP
    >>> hook.register_module(model); hook.register_loss(criterion)  # doctest: +SKIP
    """

    def __init__(
        self,
        out: str | os.PathLike[str] = "tdump.zarr",
        include_regex: str | None = None,
        save_interval: int = 100,
        save_steps: Iterable[int] | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        *,
        collections: Iterable[CollectionConfig | Mapping[str, Any]]
        | Mapping[str, Mapping[str, Any]]
        | None = None,
        _auto: bool = False,
        **settings: Any,
    ) -> None:
        data: dict[str, Any] = dict(settings)
        data.update(
            out=out,  # HookConfig refuses what is not a path (None, a number) in one line
            include_regex=include_regex,
            save_interval=save_interval,
            save_steps=save_steps,  # HookConfig checks and stores it as a tuple
            start_step=start_step,
            end_step=end_step,
        )
        if collections is not None:
            data["collections"] = collections
        self._init(HookConfig.from_dict(data), auto=_auto)

    @classmethod
    def from_config(cls, config: HookConfig, *, _auto: bool = False) -> Hook:
        """A hook with the settings of ``config``."""
        hook = cls.__new__(cls)
        hook._init(config, auto=_auto)
        return hook

    def _init(self, config: HookConfig, *, auto: bool) -> None:
        self._existing: Existing | None = prepare_out(config)  # one-line errors, before training
        self.config = config
        self._auto = auto
        self._root: nn.Module | None = None
        self._paths: dict[int, str] = {}
        self._candidates: list[tuple[str, nn.Module]] = []
        self._loss: nn.Module | None = None
        self._loss_path = "loss"
        self._scaler: Any = None
        self._handles: list[Any] = []
        self._mode: str | None = config.mode
        self._next: dict[str, int] = {"train": 0, "eval": 0, "predict": 0}
        if self._existing is not None:  # appending: step numbers go on from the last run
            for m, n in self._existing.next_steps.items():
                if m in self._next:
                    self._next[m] = n
        self._opt_steps = self._next["train"]
        self._last_train_step = self._opt_steps - 1
        self._cur: SavedStep | None = None
        self._traced: set[str] = set()
        self._channels_last: set[str] = set()
        self._calls: dict[str, list[dict[str, Any]]] = {}
        self._input_shapes: dict[str, list[list[int]]] = {}
        self._input_dtypes: dict[str, list[str]] = {}
        self._model_outputs: dict[str, list[str]] = {}
        self._enabled = True
        self._closed = False
        self._dtype = _STORE_DTYPES.get(config.storage_dtype or "")
        #: What is saved; with ``include_activations``, its activation modules' outputs
        #: in the registered model (its convs and norms when :attr:`preactivations`).
        self._sel = Selection(config)
        #: True when the model has convs but no activation module (``F.relu`` instead), so
        #: ``include_activations`` selects the conv and norm outputs (pre-activations).
        self.preactivations = False
        #: The modules whose outputs ``include_activations`` added at a traced step: the
        #: pre-activations of layers no selected activation carries (docs/capture.md).
        self.added: list[str] = []
        self._uniform = not config.collections and config.save_steps is None
        self._all = config.saved_collections(config.start_step or 0) if self._uniform else None
        self._writer = BackgroundWriter(
            lambda: open_store(self.config),  # the config as it is at the first write
            compression=config.compression,
            storage_dtype=config.storage_dtype,
            queue_size=config.queue_size,
            threads=config.writer_threads,
        )
        self._meta: dict[str, Any] = {}
        # Records kept back while auto capture's model pick is provisional (None: write).
        self._held: list[PendingRecord] | None = None
        # when to look for a stop request next (also at every saved step)
        self._next_poll = time.monotonic() + POLL_SECONDS
        #: Source of the records' ``time`` (unix seconds); replaceable for reproducible dumps.
        self.clock: Callable[[], float] = time.time
        _HOOKS.add(self)
        at_exit(functools.partial(_close_quietly, weakref.ref(self)))

    # ------------------------------------------------------------------ public API
    @property
    def out(self) -> str:
        """Where the store is written."""
        return self.config.out

    @property
    def writer(self) -> BackgroundWriter:
        """The background writer (its ``stats`` count records and bytes)."""
        return self._writer

    def steps(self) -> dict[str, int]:
        """The next step number of each mode."""
        return dict(self._next)

    def register_module(self, module: nn.Module) -> Hook:
        """Capture from ``module`` (wrappers are unwrapped; names are relative to it).

        Raises
        ------
        ConfigError
            ``module`` is not an ``nn.Module`` instance (a name, a class).
        """
        check_module("register_module", module, "the model, e.g. hook.register_module(model)")
        root = unwrap(module)
        if self._root is root:
            return self
        if self._root is not None:
            raise TdumpError(
                "this hook is already registered on another module; use one hook per model"
            )
        if self.config.include_activations:
            paths, self.preactivations = by_type(root)
            self._sel = Selection(self.config, paths)
        check_selection(self.config, root, bool(self._sel.by_type_paths))  # refused: unregistered
        self._root = root
        if self._held is None:
            try:
                self.check_existing()
            except TdumpError:
                self._root = None
                raise
        self._paths = {id(m): p for p, m in root.named_modules()}
        self._candidates = [
            (p, m)
            for p, m in root.named_modules()
            if p and self._sel.module(p) and not computes_a_tensor(p)
        ]
        install_sigterm()  # SIGTERM commits what is queued, like SIGINT (docs/capture.md)
        self._handles.append(root.register_forward_pre_hook(self._guard(self._root_pre)))
        if not self._auto:  # tdump record's hook is told of the scaler by AutoCapture
            self._handles.append(hint_unregistered(weakref.ref(self)))
        self._meta["modules"] = module_tree(root)
        return self

    def register_loss(self, loss_module: nn.Module) -> Hook:
        """Save the loss value (``losses``) and its inputs (``loss_inputs``) of ``loss_module``.

        A loss computed by a function (``F.cross_entropy``) is not a module: wrap it
        (``criterion = nn.CrossEntropyLoss()``) or call :meth:`record_loss` after it.

        Raises
        ------
        ConfigError
            ``loss_module`` is not an ``nn.Module`` instance (a function, a class).
        """
        if callable(loss_module) and not isinstance(loss_module, (nn.Module, type)):
            name = getattr(loss_module, "__name__", None)
            wrapper = loss_module_for(name)
            raise ConfigError(
                f"register_loss takes a loss module, not {described(loss_module)}; "
                f"use {f'its module, {wrapper},' if wrapper else 'a loss module'} or keep "
                "the function and call hook.record_loss(loss, logits, targets) after it"
            )
        check_module("register_loss", loss_module, "a loss module such as nn.CrossEntropyLoss()")
        if self._loss is loss_module:
            return self
        self._loss = loss_module
        path = self._paths.get(id(loss_module))
        self._loss_path = path if path else "loss"
        self._handles.append(loss_module.register_forward_hook(self._guard(self._loss_post)))
        return self

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> Hook:
        """Count train steps from ``optimizer.step()`` calls (``step_source="optimizer"``).

        Raises
        ------
        ConfigError
            ``optimizer`` is not a ``torch.optim`` optimizer.
        """
        if not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise ConfigError(
                f"register_optimizer takes a torch.optim optimizer, not {described(optimizer)}; "
                "pass the optimizer whose step() ends a train step, e.g. torch.optim.SGD(...)"
            )
        self._handles.append(
            optimizer.register_step_post_hook(lambda *_: self.optimizer_step())  # type: ignore[arg-type]
        )
        if self.config.step_source != "optimizer":
            self.config = self.config.replace(step_source="optimizer")
        return self

    def register_scaler(self, scaler: torch.amp.GradScaler) -> Hook:
        """Record gradients divided by ``scaler``'s loss scale, as ``scaler.unscale_`` would.

        ``tdump record`` finds the script's scaler itself. Each saved step also records
        the scale as ``scalars.grad_scale`` (docs/capture.md, "Mixed precision").

        Raises
        ------
        ConfigError
            ``scaler`` is not a ``torch.amp.GradScaler``.
        """
        self._scaler = require_scaler(scaler)
        return self

    def optimizer_step(self) -> None:
        """Tell the hook an optimizer step finished (done for you by :meth:`register_optimizer`)."""
        self._opt_steps += 1

    def set_mode(self, mode: str | None) -> None:
        """Fix the mode (``train``/``eval``/``predict``); ``None`` follows ``model.training``."""
        if mode not in (None, "train", "eval", "predict"):
            raise ConfigError(f"unknown mode {mode!r}; use train, eval, predict or None")
        self._mode = mode

    def save_scalar(self, name: str, value: float | torch.Tensor) -> None:
        """Save a scalar as ``scalars.<name>`` in the record of the step in progress, if saved.

        Raises
        ------
        ConfigError
            At every call, saved step or not, whatever ``strict`` says: a ``name`` that
            is not a non-empty string, a ``value`` that is not a real number or a
            one-element tensor (a string, a list, a batch of values).
        """
        value = scalar_value(name, value)
        if self._cur is not None:
            self._guard(self._cur.scalar)(name, value)

    def record_loss(self, loss: torch.Tensor, *inputs: torch.Tensor) -> None:
        """Save a loss computed by a function (``F.cross_entropy``) and its inputs.

        Raises
        ------
        ConfigError
            ``loss`` or one of ``inputs`` is not a tensor (``loss.item()``, say).
        """
        if not isinstance(loss, torch.Tensor):
            raise ConfigError(
                f"record_loss takes the loss tensor, not {described(loss)}; pass the tensor "
                "the loss function returned (before .item()), then its inputs"
            )
        for i, a in enumerate(inputs):
            if not isinstance(a, torch.Tensor):
                raise ConfigError(
                    f"record_loss takes the loss's inputs as tensors, but input {i} is "
                    f"{described(a)}; pass the tensors given to the loss function "
                    "(record_loss(loss, logits, targets))"
                )
        self._guard(self._loss_post)(None, inputs, loss)

    def _loss_post(self, module: nn.Module | None, args: tuple[Any, ...], output: Any) -> None:
        if self._cur is not None:
            self._cur.loss(self._loss_path, args, output)

    def flush(self) -> None:
        """Wait until every record handed to the writer so far is committed."""
        self._writer.flush()

    def check_existing(self) -> None:
        """Refuse (one line) a model that differs from the one in the dump being appended to."""
        old = self._existing.modules if self._existing is not None else None
        if old is None or self._root is None:
            return
        diffs = module_differences(old, module_tree(self._root))
        if diffs:
            raise ConfigError(
                f"cannot append to {self.out}: it holds another model ({len(diffs)} "
                f"difference(s), first: {diffs[0]}); pass --overwrite or choose another --out path"
            )

    def hold(self) -> None:
        """Keep finished records in memory instead of writing them, until :meth:`release`.

        Auto capture holds while its pick of the model is provisional, so that a wrong
        first pick (a submodule called alone, say) never creates or touches the store.
        """
        if self._held is None and self._writer.store is None:
            self._held = []

    @property
    def holding(self) -> bool:
        """Whether records are being held back (see :meth:`hold`)."""
        return self._held is not None

    def release(self) -> None:
        """Write the records held back by :meth:`hold` and write directly from now on."""
        held, self._held = self._held, None
        if held is None:
            return
        for rec in held:
            self._submit(rec)

    def discard(self) -> None:
        """Drop this hook without writing anything (a provisional pick that was wrong)."""
        self._closed = True
        self._held = None
        self._cur = None
        self._detach()

    def close(self) -> None:
        """Finish the step in progress, write everything queued, detach all hooks."""
        if self._closed:
            return
        self._closed = True
        cur = self._cur
        if exiting() and cur is not None and cur.mode == "train" and not cur.backward_seen:
            # a signal cut the step before its backward: an incomplete record is not kept
            self._cur = None
            cur.close()
        try:
            self._guard(self._finish)()
            self._guard(self.release)()
            if self._writer.store is not None and self._enabled:
                # where an appending run goes on (a killed run: after its last committed step)
                nxt = dict(self._next)
                nxt["train"] = max(nxt["train"], self._opt_steps)
                self._guard(self._writer.update_meta)(next_steps=nxt)
        finally:
            self._detach()
            try:
                self._writer.close(timeout=CLOSE_TIMEOUT if exiting() else None)
            except Exception as exc:
                if self.config.strict:
                    raise
                log.error("tdump: writing the dump failed: %s: %s", type(exc).__name__, exc)

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ errors
    def _guard(self, fn: Callable[..., Any]) -> Guarded:
        return Guarded(self, fn)

    def _fail(self, exc: BaseException) -> None:
        if self.config.strict:
            raise exc
        if self._enabled:
            log.error(
                "tdump: capture switched off after an error in the hook (training goes on): %s: %s",
                type(exc).__name__,
                exc,
            )
        self._enabled = False
        self._detach()
        self._cur = None

    def _leave(self) -> None:
        """In a forked child (a DataLoader worker): this copy captures and closes nothing.

        Only flags and hook handles change: the writer thread and its locks are the
        parent's, and so is the dump.
        """
        self._enabled = False
        self._closed = True
        self._writer.closed = True
        cur, self._cur = self._cur, None
        for h in (*self._handles, *(() if cur is None else (*cur.handles, *cur.grad_handles))):
            h.remove()
        self._handles.clear()

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._cur is not None:
            self._cur.close()

    # ------------------------------------------------------------------ store
    def _submit(self, rec: PendingRecord) -> None:
        if self._held is not None:
            self._held.append(rec)
            if len(self._held) >= HOLD_LIMIT:
                self.release()
            return
        if self._meta:
            meta, self._meta = self._meta, {}
            self._writer.update_meta(**meta)
        self._writer.submit(rec)


def _leave_in_child() -> None:
    for hook in list(_HOOKS):
        hook._leave()


in_forked_child(_leave_in_child)


def _close_quietly(ref: weakref.ReferenceType[Hook]) -> None:
    hook = ref()
    if hook is not None and not hook._closed:
        try:
            hook.close()
        except Exception as exc:  # pragma: no cover - interpreter shutdown
            log.error("tdump: closing the hook at exit failed: %s", exc)
