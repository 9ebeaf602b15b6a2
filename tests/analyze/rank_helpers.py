"""Make real resnet18 dumps for the ranking tests, and plain-numpy reference scores.

``make_resnet18_dump`` trains torchvision's resnet18 for a few steps and records ReLU
outputs (per call) with their gradients, conv weights with their gradients and BN
weights. It uses ``tdump.capture.Hook`` when it is available; otherwise a small
hook-based recorder that writes the same layout through ``tdump._format.StoreWriter``
(modules + calls dataflow per docs/FORMAT.md).

``record_mlp`` trains a small conv model with an MLP head (a hidden Linear) and a
Linear on channels-last tokens beside it, under the real hook.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from tdump._format import StoreReader, StoreWriter, grad_name, output_name

INCLUDE = (
    r".*relu|.*conv\d?\.weight|.*downsample\.0\.weight|.*bn\d?\.weight|.*downsample\.1\.weight"
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def _batches(n: int, batch: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def _try_hook() -> Any:
    try:
        from tdump.capture import Hook
    except ImportError:
        return None
    return Hook


def make_resnet18_dump(
    path: str,
    *,
    steps: int = 5,
    interval: int = 2,
    batch: int = 4,
    grads: bool = True,
    include: str = INCLUDE,
    use_hook: bool | None = None,
    last_batch: int | None = None,
    **hook_settings: Any,
) -> str:
    """Train resnet18 ``steps`` steps, saving every ``interval``-th; return ``path``."""
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = _batches(steps, batch)
    if last_batch is not None:
        x, y = data[-1]
        data[-1] = (x[:last_batch], y[:last_batch])
    hook_cls = _try_hook() if use_hook is not False else None
    if hook_cls is not None:
        if not grads:  # activations and weights only: names ending in .grad do not match
            include = rf"(?:{include}).*(?<!\.grad)$"
        hook = hook_cls(path, include_regex=include, save_interval=interval, **hook_settings)
        hook.register_module(model)
        hook.register_loss(loss_fn)
        model.train()
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        hook.close()
        return path
    _ManualRecorder(model, path, include, grads).run(data, loss_fn, opt, interval)
    return path


class _ManualRecorder:
    """A minimal stand-in for the capture hook, writing the documented layout."""

    def __init__(self, model: nn.Module, path: str, include: str, grads: bool) -> None:
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # keep values as the forward pass saw them
        self.model = model
        self.rx = re.compile(include)
        self.grads = grads
        self.writer = StoreWriter.create(path)
        self.producer: dict[int, str] = {}
        self.calls: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.saving = False
        self.first = True
        self.acts: dict[str, tuple[np.ndarray, str, int]] = {}
        self.act_grads: dict[str, np.ndarray] = {}
        self.names = {m: n for n, m in model.named_modules()}
        for mod in model.modules():
            mod.register_forward_pre_hook(self._pre)
            mod.register_forward_hook(self._post)

    def _pre(self, mod: nn.Module, args: tuple[Any, ...]) -> None:
        self._inputs = [self.producer.get(id(a)) for a in args if isinstance(a, torch.Tensor)]
        self._pending_inputs = getattr(self, "_pending_inputs", {})
        self._pending_inputs[id(mod)] = self._inputs

    def _post(self, mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        path = self.names[mod]
        if path == "" or not isinstance(out, torch.Tensor):
            return
        k = self.counts.get(path, 0)
        self.counts[path] = k + 1
        name = output_name(path, k)
        inputs = self._pending_inputs.pop(id(mod), [])
        if self.first:
            self.calls.append(
                {
                    "name": name,
                    "module": path,
                    "call": k,
                    "inputs": inputs,
                    "shape": list(out.shape),
                }
            )
        self.producer[id(out)] = name
        if self.saving and self.rx.search(name):
            self.acts[name] = (out.detach().numpy().copy(), path, k)
            if self.grads and out.requires_grad:
                out.register_hook(lambda g, n=name: self.act_grads.__setitem__(n, g.numpy().copy()))

    def run(self, data: list[Any], loss_fn: nn.Module, opt: Any, interval: int) -> None:
        from tdump.capture._model import module_tree

        self.writer.update_meta(modules=module_tree(self.model))
        self.first = True
        record = 0
        for step, (x, y) in enumerate(data):
            self.saving = step % interval == 0
            self.counts.clear()
            self.producer.clear()
            self.acts.clear()
            self.act_grads.clear()
            self.producer[id(x)] = "<input>"
            opt.zero_grad()
            loss_fn(self.model(x), y).backward()
            if self.first:
                self.writer.update_meta(calls={"train": self.calls})
                self.first = False
            if self.saving:
                self._write(record, step, x.shape[0])
                record += 1
            opt.step()

    def _write(self, record: int, step: int, batch: int) -> None:
        w = self.writer
        dims = ("batch", "channel", "y", "x")
        for name, (val, path, k) in self.acts.items():
            attrs = {"collection": "activations", "kind": "output", "module": path, "call": k}
            w.write_tensor("train", record, name, val, dims=dims[: val.ndim], attrs=attrs)
            if name in self.act_grads:
                g = self.act_grads[name]
                attrs = {**attrs, "collection": "activation_gradients", "kind": "output_grad"}
                w.write_tensor(
                    "train", record, grad_name(name), g, dims=dims[: g.ndim], attrs=attrs
                )
        for pname, p in self.model.named_parameters():
            if not self.rx.search(pname) or p.dim() not in (1, 4):
                continue
            pdims = ("out_channel", "in_channel", "ky", "kx") if p.dim() == 4 else ("channel",)
            mod = pname.rsplit(".", 1)[0]
            attrs = {"collection": "weights", "kind": "parameter", "module": mod}
            w.write_tensor(
                "train", record, pname, p.detach().numpy().copy(), dims=pdims, attrs=attrs
            )
            if self.grads and p.grad is not None:
                attrs = {**attrs, "collection": "gradients", "kind": "parameter_grad"}
                w.write_tensor(
                    "train",
                    record,
                    grad_name(pname),
                    p.grad.numpy().copy(),
                    dims=pdims,
                    attrs=attrs,
                )
        w.commit("train", record, step=step, batch_size=batch)


# --------------------------------------------------------------------------- numpy reference
def _rows(reader: StoreReader, name: str, mode: str = "train") -> list[tuple[int, np.ndarray]]:
    """(step, value) for every committed record holding ``name`` (batch rows trimmed)."""
    rec = reader.records(mode)
    arr = reader.array(mode, name)
    saved = set(reader.saved_records(mode, name).tolist())
    batched = (reader.tensor_attrs(mode, name).get("dims") or [None])[0] == "batch"
    out = []
    for i, (step, bs) in enumerate(zip(rec["step"], rec["batch_size"], strict=True)):
        if i in saved:
            v = np.asarray(arr[i], dtype=np.float64)
            out.append((int(step), v[:bs] if batched else v))
    return out


def magnitude(reader: StoreReader, layer_sources: dict[str, str] | str) -> np.ndarray:
    """Per channel, ``1/N sum_b 1/(HW) sum |A * G|``: the scale the Taylor sums' float32 error is bounded by."""
    srcs = layer_sources.split(",") if isinstance(layer_sources, str) else layer_sources
    acts = dict(_rows(reader, srcs[0]))
    per_example = [np.abs(acts[step] * g).mean(axis=(2, 3)) for step, g in _rows(reader, srcs[1])]
    return np.concatenate(per_example).mean(axis=0)


def reference(reader: StoreReader, criterion: str, layer_sources: dict[str, str]) -> np.ndarray:
    """Plain numpy score of one layer (the formulas of docs/ranking.md), float64 throughout."""
    srcs = layer_sources.split(",") if isinstance(layer_sources, str) else layer_sources
    if criterion in ("taylor", "taylor-signed"):
        acts = dict(_rows(reader, srcs[0]))
        per_example = []
        for step, g in _rows(reader, srcs[1]):
            prod = (acts[step] * g).mean(axis=(2, 3))
            per_example.append(np.abs(prod) if criterion == "taylor" else prod)
        return np.concatenate(per_example).mean(axis=0)
    if criterion == "apoz":
        fr = [(a == 0).mean(axis=(2, 3)) for _, a in _rows(reader, srcs[0])]
        return 1.0 - np.concatenate(fr).mean(axis=0)
    if criterion == "l1":
        w = _rows(reader, srcs[0])[-1][1]
        return np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
    if criterion == "bn-gamma":
        return np.abs(_rows(reader, srcs[0])[-1][1])
    if criterion == "taylor-weight":
        ws = dict(_rows(reader, srcs[0]))
        vals = [
            ((ws[s] * g).reshape(g.shape[0], -1).sum(axis=1)) ** 2
            for s, g in _rows(reader, srcs[1])
        ]
        return np.mean(vals, axis=0)
    raise ValueError(criterion)


# --------------------------------------------------------------------------- small Hook dumps
#: `tdump record`'s default ``--include``.
RECORD_INCLUDE = ".*relu|.*weight|.*bias|.*running_mean|.*running_var"


class SmallNet(nn.Module):
    """Conv-BN-ReLU x2 on 1x8x8 inputs, like a user's first script."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = (
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )
        self.conv2, self.bn2, self.relu2 = (
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def record_small(
    path: str, *, train_steps: int = 4, eval_steps: int = 1, **hook_settings: Any
) -> str:
    """Train :class:`SmallNet` ``train_steps`` steps, then run ``eval_steps`` eval batches.

    Every step of each mode is saved (``save_interval=1``), by default with `tdump
    record`'s selection; ``hook_settings`` go to :class:`tdump.capture.Hook` (e.g.
    ``reduction="taylor"``, ``include_regex``).
    """
    from tdump.capture import Hook

    torch.manual_seed(0)
    model, loss_fn = SmallNet(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    settings = {"include_regex": RECORD_INCLUDE, "include_activations": True, **hook_settings}
    hook = Hook(path, save_interval=1, **settings)
    hook.register_module(model)
    hook.register_loss(loss_fn)
    for step in range(train_steps + eval_steps):
        x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        if step < train_steps:
            model.train()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        else:
            model.eval()
            with torch.no_grad():
                loss_fn(model(x), y)
    hook.close()
    return path


class MLPHead(nn.Module):
    """conv -> bn -> relu -> pool -> fc1 -> relu -> dropout -> fc2, plus a token MLP beside it."""

    def __init__(self, token_act: str = "gelu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 12)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(12, 4)
        # a Linear on a (batch, tokens, features) tensor: its features sit on the last axis
        self.tok = nn.Linear(8, 6)
        self.tok_act: nn.Module = nn.ReLU() if token_act == "relu" else nn.GELU()
        self.tok_out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        head = self.fc2(self.drop(self.act(self.fc1(self.pool(y).flatten(1)))))
        tokens = y.flatten(2).transpose(1, 2)  # (batch, 36 positions, 8)
        return head + self.tok_out(self.tok_act(self.tok(tokens))).mean(1)


def record_mlp(path: Path, reduction: str | None = None, token_act: str = "gelu") -> MLPHead:
    """Train :class:`MLPHead` 5 steps under the real hook, saving every 2nd; return the model."""
    from tdump.capture import Hook

    torch.manual_seed(0)
    model = MLPHead(token_act)
    lossf = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    extra = {"reduction": reduction} if reduction else {}
    g = torch.Generator().manual_seed(1)
    with Hook(
        str(path),
        include_regex=r".*relu|(?:^|\.)(?:act|tok_act)$|.*weight",
        include_activations=True,
        save_interval=2,
        strict=True,
        **extra,
    ) as hook:
        hook.register_module(model)
        hook.register_loss(lossf)
        for _ in range(5):
            x, y = torch.randn(6, 3, 6, 6, generator=g), torch.randint(0, 4, (6,), generator=g)
            opt.zero_grad()
            lossf(model(x), y).backward()
            opt.step()
    return model
