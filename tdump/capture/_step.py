"""One saved step in progress: the tensors it copies and the calls it traces.

:class:`SavedStep` lives from the root module's forward pre-hook of a saved step to
the start of the next step (or ``Hook.close``). Its hooks close over it, so a late
gradient hook of an old step never writes into a newer one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tdump._format import grad_name, input_name, output_name, scalar_name
from tdump._modtypes import is_elementwise_type, is_linear_type, type_name
from tdump.capture._amp import unscale
from tdump.capture._autograd import summands
from tdump.capture._model import (
    channels_first,
    first_tensor,
    output_dims,
    param_dims,
    reduce_channels,
    reduced_dims,
    snapshot,
)
from tdump.capture._writer import HostBuffers, PendingRecord

__all__ = ["SavedStep"]


class SavedStep:
    """State and hook bodies of the saved step ``step`` of ``mode``.

    Parameters
    ----------
    selected
        ``(name, collection) -> bool``: the hook's (cached) selection.
    guard
        Wraps a hook body so that errors switch capture off (or re-raise if strict).
    reduction, dtype
        Reduce-at-source setting and storage dtype of the copies.
    buffers
        Reused host buffers for the copies (the writer's), or ``None``.
    trace
        Record the ``calls`` dataflow of this forward pass.
    channels_last
        The hook's set of module outputs (``<module>.output_<k>``) whose channels are
        their last dim: a Linear's ``(batch, tokens, features)`` output and what
        element-wise modules make of it. A traced step fills it; later steps read it
        (reductions run over the other dims).
    grad_scale
        ``() -> scale or None``: the loss scale of the script's ``GradScaler`` now
        (:mod:`tdump.capture._amp`); gradients are copied divided by it.
    """

    def __init__(
        self,
        mode: str,
        step: int,
        collections: frozenset[str],
        *,
        trace: bool,
        selected: Callable[[str, str], bool],
        guard: Callable[[Any], Any],
        reduction: str | None,
        dtype: torch.dtype | None,
        buffers: HostBuffers | None = None,
        channels_last: set[str] | None = None,
        grad_scale: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.mode = mode
        self.step = step
        self.collections = collections
        self.trace = trace
        self.selected = selected
        self.guard = guard
        self.reduction = reduction
        self.dtype = dtype
        self.buffers = buffers
        self.channels_last = channels_last if channels_last is not None else set()
        self.grad_scale = grad_scale
        self.scale_noted = False
        self.open = True
        #: Whether a backward pass reached this step's outputs or parameters (a forward
        #: without one, a dry run, is replaced by the next forward of the same step).
        self.backward_seen = False
        self.record = PendingRecord(mode, step)
        self.counts: dict[str, int] = {}
        self.calls: list[dict[str, Any]] = []
        #: Shapes of the traced forward's tensor arguments (batch included): FLOPs need them.
        self.input_shapes: list[list[int]] = []
        #: Their dtypes (``"float32"``, ``"int64"``): a second input may be timesteps.
        self.input_dtypes: list[str] = []
        self.producers: dict[int, tuple[str, torch.Tensor | None]] = {}
        #: Each traced call's output's in-place version when the call returned, by name.
        self.versions: dict[str, int] = {}
        #: The autograd node of each traced call's output, by its output's name: a
        #: later call's input traced back through additions ends at these (``sum_of``).
        self.grad_nodes: dict[Any, str] = {}
        self.handles: list[Any] = []
        self.grad_handles: list[Any] = []
        #: Module calls of a train step that ran without grad (reentrant activation
        #: checkpointing): path -> [(call, fingerprint of its output)], in call order.
        self.awaiting: dict[str, list[tuple[int, Fingerprint]]] = {}
        #: The modules with forward hooks in this step, by path (until the forward ends).
        self.hooked: dict[str, nn.Module] = {}
        #: CUDA streams this step queued copies on: one event each at close, not one per copy.
        self.streams: dict[tuple[int, int], Any] = {}
        self.lock = threading.Lock()

    def close(self) -> PendingRecord:
        """Remove every hook of this step and return its record."""
        self.open = False
        for h in (*self.handles, *self.grad_handles):
            h.remove()
        self.handles.clear()
        self.grad_handles.clear()
        self.producers.clear()
        self.versions.clear()
        self.grad_nodes.clear()
        self.awaiting.clear()
        with self.lock:
            # recorded after every copy queued on its stream: the writer waits on these
            self.record.events = [s.record_event() for s in self.streams.values()]
            self.streams.clear()
            return self.record

    def saw_backward(self, *_: Any) -> None:
        """Gradient hook body: note that a backward pass ran through this step."""
        self.backward_seen = True

    def save_params(self, root: nn.Module) -> None:
        colls = self.collections
        for name, p in root.named_parameters():
            coll = "biases" if name.endswith("bias") else "weights"
            local = name.rsplit(".", 1)[-1]
            module = name.rsplit(".", 1)[0] if "." in name else ""
            if coll in colls and self.selected(name, coll):
                self.add(name, p, param_dims(local, p.dim()), coll, "parameter", module)
            gname = grad_name(name)
            if p.requires_grad and "gradients" in colls and self.selected(gname, "gradients"):
                self.grad_handles.append(
                    p.register_post_accumulate_grad_hook(
                        self.guard(self._make_param_grad(gname, local, module))
                    )
                )
        if "running_stats" in colls:
            for name, b in root.named_buffers():
                if b is not None and self.selected(name, "running_stats"):
                    local = name.rsplit(".", 1)[-1]
                    module = name.rsplit(".", 1)[0] if "." in name else ""
                    self.add(name, b, param_dims(local, b.dim()), "running_stats", "buffer", module)

    def add(
        self,
        name: str,
        t: torch.Tensor,
        dims: tuple[str, ...],
        coll: str,
        kind: str,
        module: str,
        extra: Mapping[str, Any] | None = None,
        reduced: bool = False,
        gradient: bool = False,
    ) -> None:
        # a reduction is small already; a scalar keeps its own dtype, as the writer stores it
        dtype = None if reduced or coll == "scalars" else self.dtype
        source_dtype = t.dtype
        scale = self.grad_scale() if gradient and self.grad_scale is not None else None
        if scale is not None:
            t = unscale(t, scale)
            if not self.scale_noted:  # the step's record says what its gradients were divided by
                self.scale_noted = True
                # whatever the selection says: the record's gradients mean nothing without it
                value = scale.detach().reshape(())
                self.add(scalar_name("grad_scale"), value, (), "scalars", "scalar", "")
        host = snapshot(t, dtype, None if reduced else self.buffers)
        stream = torch.cuda.current_stream(t.device) if t.is_cuda else None
        attrs = {
            "collection": coll,
            "kind": kind,
            "module": module,
            "source_dtype": str(source_dtype).replace("torch.", ""),
            **(extra or {}),
        }
        with self.lock:
            if stream is not None:
                self.streams.setdefault((stream.device_index, stream.stream_id), stream)
            self.record.add(name, host, dims=dims, attrs=attrs)

    def _make_param_grad(self, gname: str, local: str, module: str) -> Any:
        def on_grad(p: torch.Tensor) -> None:
            self.backward_seen = True
            if p.grad is not None and self.open:
                dims = param_dims(local, p.grad.dim())
                self.add(gname, p.grad, dims, "gradients", "parameter_grad", module, gradient=True)

        return on_grad

    def returned(self, outputs: list[torch.Tensor]) -> list[str]:
        """Names of the module calls whose outputs are ``outputs`` themselves (traced steps)."""
        names = []
        for out in outputs:
            prod = self.producers.get(id(out))
            if prod is not None and prod[1] is out and prod[0] != "<input>":
                names.append(prod[0])
        return names

    def make_fwd(self, path: str) -> Any:
        def fwd(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.open:
                return
            k = self.counts.get(path, 0)
            self.counts[path] = k + 1
            name = output_name(path, k)
            out = first_tensor(output)
            if self.trace:
                inputs = []
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                for a in tensors:
                    prod = self.producers.get(id(a))
                    inputs.append(prod[0] if prod is not None and prod[1] is a else None)
                call: dict[str, Any] = {
                    "name": name,
                    "module": path,
                    "call": k,
                    "inputs": inputs,
                    "shape": list(out.shape) if out is not None else None,
                }
                summed = self._summands(tensors[0], out) if tensors else None
                if summed:
                    call["sum_of"] = summed
                self.calls.append(call)
                if out is not None:
                    self.producers[id(out)] = (name, out)
                    if not out.is_inference():  # inference tensors count no in-place changes
                        self.versions[name] = out._version
                    if out.grad_fn is not None:
                        self.grad_nodes[out.grad_fn] = name
                    self._note_layout(module, name, out, inputs)
            if out is None or not out.is_floating_point():
                return
            self._save_output(path, k, name, out)

        return fwd

    def _summands(self, first: torch.Tensor, out: torch.Tensor | None) -> list[str] | None:
        """:func:`summands` of a call's first tensor argument, as the call received it.

        An in-place module (``ReLU(inplace=True)``) has already overwritten it: its
        node is then the module's own, and the argument's is the one before it. A
        module that returns its argument as it came (``Identity``, an empty
        ``Sequential``) leaves a node that is a traced call's own, or a sum's.
        """
        node = first.grad_fn
        found = summands(node, self.grad_nodes)
        if found is None and first is out and node is not None and node not in self.grad_nodes:
            before = [fn for fn, _ in node.next_functions if fn is not None]
            found = summands(before[0], self.grad_nodes) if len(before) == 1 else None
        return found

    def _note_layout(
        self, module: nn.Module, name: str, out: torch.Tensor, inputs: list[str | None]
    ) -> None:
        """Note whether output ``name`` is channels-last: a Linear's on 3+ dims, or an
        element-wise module's (GELU, Dropout) on such an output."""
        typ = type_name(type(module))
        last = out.dim() >= 3 and (
            is_linear_type(typ)
            or (is_elementwise_type(typ) and bool(inputs) and inputs[0] in self.channels_last)
        )
        if last:
            self.channels_last.add(name)
        else:
            self.channels_last.discard(name)

    def save_late(self, paths: frozenset[str]) -> None:
        """After the traced forward: save the outputs of the modules at ``paths`` that the
        selection has just taken, as their calls would have, where no in-place operation
        has changed them since (those, and inference tensors, which count no changes, are
        saved from the next step on)."""
        outputs = {name: out for name, out in self.producers.values() if out is not None}
        for call in self.calls:
            name, out = str(call["name"]), outputs.get(str(call["name"]))
            if str(call["module"]) not in paths or out is None or not out.is_floating_point():
                continue
            if name in self.versions and out._version == self.versions[name]:
                self._save_output(str(call["module"]), int(call["call"]), name, out)

    def _save_output(self, path: str, k: int, name: str, out: torch.Tensor) -> None:
        red = self.reduction
        colls = self.collections
        want_act = "activations" in colls and self.selected(name, "activations")
        gname = grad_name(name)
        want_grad = "activation_gradients" in colls and self.selected(gname, "activation_gradients")
        if red == "taylor":
            want_grad = want_act or want_grad  # a Taylor term is the output times its gradient
        elif want_act:
            last, dims, extra = self._layout(name, k, out)
            value = reduce_channels(out, red, last) if red else out
            self.add(name, value, dims, "activations", "output", path, extra, bool(red))
        # a gradient's fraction of zeros means nothing: zero_fraction stores outputs only
        if not want_grad or red == "zero_fraction":
            return
        if out.requires_grad:
            self._watch_grad(path, k, name, out)
        elif self.mode == "train" and not torch.is_grad_enabled():
            # Reentrant activation checkpointing (torch.utils.checkpoint with
            # use_reentrant=True, its default) runs this call without grad; backward
            # runs it again with grad, and that output's gradient is this one's.
            self.awaiting.setdefault(path, []).append((k, _fingerprint(out)))

    def _layout(
        self, name: str, k: int, out: torch.Tensor
    ) -> tuple[bool, tuple[str, ...], dict[str, Any]]:
        """Whether output ``name`` is channels-last, its dims and its array attributes."""
        extra: dict[str, Any] = {"call": k}
        last = out.dim() >= 3 and name in self.channels_last
        if last:
            extra["channel_axis"] = -1
        red = self.reduction
        if red is None:
            return last, output_dims(out.dim(), last), extra
        if red != "taylor":
            extra["reduction"] = red
        return last, reduced_dims(out.dim(), last), extra

    def _watch_grad(self, path: str, k: int, name: str, out: torch.Tensor) -> None:
        """Copy the gradient of call ``k``'s output ``out`` (or its Taylor term) when
        backward reaches it."""
        last, dims, extra = self._layout(name, k, out)
        if self.reduction == "taylor":
            act = out.detach().clone()
            body = self._make_taylor(name + ".taylor", path, act, extra, last)
        else:
            body = self._make_out_grad(grad_name(name), path, dims, extra, last)
        self.grad_handles.append(out.register_hook(self.guard(body)))

    def watch_recomputes(self, modules: Mapping[str, nn.Module]) -> None:
        """After the forward pass: hook the modules whose calls ran without grad in a
        train step, to take the gradients when backward runs those calls again."""
        for path in self.awaiting:
            module = modules.get(path)
            if module is not None:
                hook = self.guard(self._make_recompute(path))
                self.grad_handles.append(module.register_forward_hook(hook))

    def _make_recompute(self, path: str) -> Any:
        def fwd(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            waiting = self.awaiting.get(path)
            out = first_tensor(output)
            if not self.open or not waiting or out is None or not out.requires_grad:
                return
            if torch._C._current_autograd_node() is None:
                return  # a new forward pass (a second micro-batch), not backward's rerun
            # Backward reruns checkpointed segments last first; the rerun of a module
            # called in two of them is told apart by its values.
            i = 0
            if len(waiting) > 1:
                fp = _fingerprint(out)
                i = min(range(len(waiting)), key=lambda j: _distance(waiting[j][1], fp))
            k = waiting.pop(i)[0]
            self._watch_grad(path, k, output_name(path, k), out)

        return fwd

    def _make_out_grad(
        self, gname: str, path: str, dims: tuple[str, ...], extra: dict[str, Any], last: bool
    ) -> Any:
        red = self.reduction

        def on_grad(g: torch.Tensor) -> None:
            if self.open:
                value = reduce_channels(g, red, last) if red else g
                self.add(
                    gname,
                    value,
                    dims,
                    "activation_gradients",
                    "output_grad",
                    path,
                    extra,
                    bool(red),
                    gradient=True,
                )

        return on_grad

    def _make_taylor(
        self, tname: str, path: str, act: torch.Tensor, extra: dict[str, Any], last: bool
    ) -> Any:
        def on_grad(g: torch.Tensor) -> None:
            if self.open:
                prod = channels_first(act.float() * g.detach().float(), last)
                value = prod.mean(tuple(range(2, prod.dim()))) if prod.dim() > 2 else prod
                dims = reduced_dims(act.dim(), last)
                attrs = {**extra, "reduction": "taylor"}
                self.add(
                    tname,
                    value,
                    dims,
                    "activation_gradients",
                    "output_taylor",
                    path,
                    attrs,
                    True,
                    gradient=True,
                )

        return on_grad

    def loss(self, path: str, args: tuple[Any, ...], output: Any) -> None:
        k = self.counts.get(path, 0)
        self.counts[path] = k + 1
        out = first_tensor(output)
        name = output_name(path, k)
        if out is not None and "losses" in self.collections and self.selected(name, "losses"):
            self.add(name, out, output_dims(out.dim()), "losses", "loss", path, {"call": k})
        if "loss_inputs" in self.collections:
            for i, a in enumerate(args):
                iname = input_name(path, k, i)
                if isinstance(a, torch.Tensor) and self.selected(iname, "loss_inputs"):
                    dims = output_dims(a.dim())
                    self.add(iname, a, dims, "loss_inputs", "loss_input", path, {"call": k})

    def scalar(self, name: str, value: float | torch.Tensor) -> None:
        sname = scalar_name(name)
        if (
            not self.open
            or "scalars" not in self.collections
            or not self.selected(sname, "scalars")
        ):
            return
        t = (
            value.detach().reshape(())
            if isinstance(value, torch.Tensor)
            else torch.tensor(float(value))
        )
        self.add(sname, t, (), "scalars", "scalar", "")


Fingerprint = tuple[tuple[int, ...], torch.Tensor]


def _fingerprint(out: torch.Tensor) -> Fingerprint:
    """A cheap summary of an output: its shape and the sum of its values (left on its
    device, so a GPU forward pass does not wait for it)."""
    return tuple(out.shape), out.detach().sum(dtype=torch.float32)


def _distance(a: Fingerprint, b: Fingerprint) -> float:
    return float("inf") if a[0] != b[0] else float((a[1] - b[1]).abs())
