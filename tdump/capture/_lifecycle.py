"""The per-step half of :class:`~tdump.capture.Hook`: numbering steps, saved steps, stop requests.

:class:`StepLifecycle` is mixed into ``Hook``; it runs in the root module's forward
pre-hook (every step: count, decide, maybe poll for a stop request) and, at saved
steps, attaches the step's hooks and hands its record to the writer when the next
step begins.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tdump._control import POLL_SECONDS, StopRequest, read_stop_request
from tdump._dataflow import Dataflow
from tdump.capture._amp import cover_scaler_classes, scale_of
from tdump.capture._autograd import tail_calls
from tdump.capture._config import HookConfig
from tdump.capture._exit import TrainingStopped
from tdump.capture._model import first_tensor, fx_tracing
from tdump.capture._selection import Selection, leaf_modules
from tdump.capture._step import SavedStep
from tdump.capture._writer import BackgroundWriter, PendingRecord

__all__ = ["StepLifecycle"]

log = logging.getLogger("tdump.capture")


class StepLifecycle:
    """Step numbering and saved-step handling; needs the attributes ``Hook._init`` sets."""

    config: HookConfig
    _mode: str | None
    _next: dict[str, int]
    _opt_steps: int
    _last_train_step: int
    _cur: SavedStep | None
    _traced: set[str]
    #: Module outputs whose channels are their last dim, as the traced steps found them.
    _channels_last: set[str]
    _calls: dict[str, list[dict[str, Any]]]
    _input_shapes: dict[str, list[list[int]]]
    _input_dtypes: dict[str, list[str]]
    _model_outputs: dict[str, list[str]]
    _meta: dict[str, Any]
    _uniform: bool
    _all: frozenset[str] | None
    _candidates: list[tuple[str, nn.Module]]
    _sel: Selection
    _root: nn.Module | None
    added: list[str]
    _dtype: torch.dtype | None
    _writer: BackgroundWriter
    _next_poll: float
    #: The script's GradScaler (``Hook.register_scaler``), or None.
    _scaler: Any
    clock: Callable[[], float]

    def _guard(self, fn: Any) -> Any:
        raise NotImplementedError

    def _submit(self, rec: PendingRecord) -> None:
        raise NotImplementedError

    def _grad_scale(self) -> torch.Tensor | None:
        return scale_of(self._scaler)

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ step lifecycle
    def _current_mode(self, root: nn.Module) -> str:
        return self._mode or ("train" if root.training else "eval")

    def _collections_at(self, step: int, mode: str) -> frozenset[str]:
        cfg = self.config
        if self._uniform:
            if (cfg.start_step is not None and step < cfg.start_step) or (
                cfg.end_step is not None and step >= cfg.end_step
            ):
                return frozenset()
            assert self._all is not None
            hit = (step - (cfg.start_step or 0)) % cfg.interval(mode) == 0
            return self._all if hit else frozenset()
        return cfg.saved_collections(step, mode)

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if fx_tracing():
            return  # torch.fx calls with proxies (symbolic_trace, tdump.load): not a step
        mode = self._current_mode(module)
        optimizer_steps = mode == "train" and self.config.step_source == "optimizer"
        cur = self._cur
        if (
            optimizer_steps
            and cur is not None
            and cur.mode == "train"
            and cur.step == self._opt_steps
            and not cur.backward_seen
        ):
            # The step's earlier forward saw no backward (a dry run, a summary): this
            # forward of the same optimizer step replaces it.
            self._cur = None
            cur.close()
            self._begin(module, args, mode, cur.step, cur.collections)
            return
        if cur is not None:
            self._finish()
        if optimizer_steps:
            step = self._opt_steps
            if step == self._last_train_step:
                return  # another forward within the same optimizer step
            self._last_train_step = step
            self._next["train"] = step + 1
        else:
            step = self._next[mode]
            self._next[mode] = step + 1
        colls = self._collections_at(step, mode)
        if colls or time.monotonic() >= self._next_poll:
            request = self._stop_request()
            if request is not None:
                self._stop(request, mode, step)
        if not colls:
            return
        self._begin(module, args, mode, step, colls)

    # ------------------------------------------------------------------ stop requests
    def _stop_request(self) -> StopRequest | None:
        """The dump's stop request, if any (at saved steps, else every POLL_SECONDS)."""
        self._next_poll = time.monotonic() + POLL_SECONDS
        try:
            return read_stop_request(self.config.out)
        except Exception as exc:  # an unreachable store must not stop training
            log.debug("tdump: looking for a stop request failed: %s", exc)
            return None

    def _stop(self, request: StopRequest, mode: str, step: int) -> None:
        """Commit what is queued, close the store, end training with TrainingStopped."""
        by = f" by {request.requested_by}" if request.requested_by else ""
        reason = request.reason or "no reason given"
        message = (
            f"stop requested{by} ({reason}); training stopped before {mode} step {step}, "
            f"the dump {self.config.out} is closed"
        )
        print(f"tdump: {message}", file=sys.stderr, flush=True)
        self.close()
        raise TrainingStopped(message, request)

    def _begin(
        self, root: nn.Module, args: tuple[Any, ...], mode: str, step: int, colls: frozenset[str]
    ) -> None:
        cover_scaler_classes()  # a GradScaler subclass the script defined or imported since
        cur = SavedStep(
            mode,
            step,
            colls,
            trace=mode not in self._traced,
            selected=self._sel,
            guard=self._guard,
            reduction=self.config.reduction,
            dtype=self._dtype,
            buffers=self._writer.buffers,
            channels_last=self._channels_last,
            grad_scale=self._grad_scale,
        )
        self._cur = cur
        x = first_tensor(args)
        if x is not None and x.dim() > 0:
            cur.record.batch_size = int(x.shape[0])
        if cur.trace:
            for a in args:
                if isinstance(a, torch.Tensor):
                    cur.producers[id(a)] = ("<input>", a)
                    cur.input_shapes.append([int(n) for n in a.shape])
                    cur.input_dtypes.append(str(a.dtype).removeprefix("torch."))
        cur.save_params(root)
        want_outputs = colls & {"activations", "activation_gradients"}
        modules = self._candidates if want_outputs else []
        if cur.trace:
            seen = {id(m) for _, m in modules}
            leaves = [(p, m) for p, m in leaf_modules(root) if id(m) not in seen]
            modules = [*modules, *leaves]
        for path, mod in modules:
            cur.handles.append(mod.register_forward_hook(self._guard(cur.make_fwd(path))))
        cur.hooked = dict(modules)
        cur.handles.append(root.register_forward_hook(self._guard(self._root_post)))

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        cur = self._cur
        if cur is None:
            return
        for h in cur.handles:  # forward hooks go now; parameter gradient hooks at the step's end
            h.remove()
        cur.handles.clear()
        cur.watch_recomputes(cur.hooked)
        cur.hooked = {}
        outs = _tensors(output)
        # a pass without autograd records no sums, so a ResNet's downsample would look
        # unreached; and ranking reads train steps' gradients
        picking = cur.trace and self.config.include_activations and cur.mode == "train"
        picking = picking and torch.is_grad_enabled()
        tail = tail_calls([o.grad_fn for o in outs], cur.grad_nodes) if picking else []
        cur.grad_nodes.clear()  # only the forward's sums need them: let the graph go
        for out in outs:
            if out.requires_grad:
                cur.grad_handles.append(out.register_hook(self._guard(cur.saw_backward)))
        if cur.trace:
            self._traced.add(cur.mode)
            self._calls[cur.mode] = cur.calls
            self._meta["calls"] = dict(self._calls)
            # the calls whose outputs the model returns as they are: their channels are
            # the model's (the classes of a segmentation head), so no pruning changes them
            self._model_outputs[cur.mode] = cur.returned(outs)
            self._meta["model_outputs"] = dict(self._model_outputs)
            if picking:
                self._select_unreached(cur, tail)
            if cur.input_shapes:
                self._input_shapes[cur.mode] = cur.input_shapes
                self._input_dtypes[cur.mode] = cur.input_dtypes
                self._meta["input_shapes"] = dict(self._input_shapes)
                self._meta["input_dtypes"] = dict(self._input_dtypes)
            cur.producers.clear()

    def _select_unreached(self, cur: SavedStep, tail: list[str]) -> None:
        """Select the pre-activations of the layers no selected output carries.

        ``include_activations`` takes the activation modules' outputs; a layer none of
        them carries (a U-Net's up-conv, concatenated with a skip first) would have no
        Taylor score, so the output that carries it furthest is taken too
        (:meth:`~tdump._dataflow.Dataflow.unreached`), from this (train) step on.
        """
        # a functional tail's calls (``interpolate(self.cls(x))``) end the model too
        returned = frozenset(self._model_outputs.get(cur.mode, ())) | frozenset(tail)
        flow = Dataflow(self._meta.get("modules") or {}, cur.calls, returned)
        recorded = [str(c["name"]) for c in cur.calls if self._sel.records(str(c["name"]))]
        paths = frozenset(flow.unreached(recorded).values())
        if not paths or self._root is None:
            return
        self._sel.add_modules(paths)
        self.added += sorted(paths - set(self.added))
        known = {p for p, _ in self._candidates}
        self._candidates += [
            (p, m) for p, m in self._root.named_modules() if p in paths and p not in known
        ]
        cur.save_late(paths)

    def _finish(self) -> None:
        """End the saved step in progress: drop its hooks and hand its record to the writer."""
        cur, self._cur = self._cur, None
        if cur is None:
            return
        rec = cur.close()
        rec.wall_time = self.clock()
        if rec.entries or cur.trace:
            self._submit(rec)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or one level of tuple/list/dict)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []
