"""GPU check of the capture path: record a CUDA resnet18 and compare the dump with the model.

Run on a machine with a CUDA GPU: ``python benchmarks/gpu_smoke.py`` (``... cpu``: the same
check on the CPU). It trains a few steps on the GPU under ``tdump.Hook`` (pinned,
non-blocking copies), then reopens the dump and checks that the stored weights,
gradients and activations equal what the model held at those steps (copied to the CPU
independently, synchronously), bit for bit. Then it checks reduce-at-source on the
device (``reduction="taylor"``, what ``tdump loop`` records, and ``"zero_fraction"``)
against numpy on synchronous copies of the full tensors.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from torch import nn

import tdump
from tdump.analyze import Trial


def main() -> int:
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA device: nothing to check (python benchmarks/gpu_smoke.py cpu runs it on the CPU)"
        )
        return 0
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    out = tempfile.mkdtemp() + "/gpu.zarr"
    expected: dict[tuple[int, str], np.ndarray] = {}
    acts: dict[str, torch.Tensor] = {}

    def keep_first(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        # BasicBlock calls its relu twice: output_0 is the first call of each forward.
        # Returns None: a forward hook that returns a value replaces the module's output.
        if "a" not in acts:
            acts["a"] = output.detach().cpu().clone()

    model.layer1[0].relu.register_forward_hook(keep_first)
    hook = tdump.Hook(out, include_regex=".*relu|.*weight", save_interval=2, strict=True)
    hook.register_module(model)
    hook.register_loss(loss_fn)
    t0 = time.perf_counter()
    for step in range(6):
        x = torch.randn(16, 3, 64, 64, device=dev)
        y = torch.randint(0, 10, (16,), device=dev)
        opt.zero_grad()
        acts.clear()
        loss = loss_fn(model(x), y)
        loss.backward()
        if step % 2 == 0:
            expected[(step, "conv1.weight")] = model.conv1.weight.detach().cpu().numpy().copy()
            expected[(step, "conv1.weight.grad")] = (
                model.conv1.weight.grad.detach().cpu().numpy().copy()
            )
            expected[(step, "act")] = acts["a"].numpy()
        opt.step()
    hook.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "the CPU"
    print(f"6 steps + close: {time.perf_counter() - t0:.2f} s on {where}")
    trial = Trial(out)
    names = trial.tensor_names()
    act_name = "layer1.0.relu.output_0"
    assert act_name in names, names[:20]
    bad = 0
    for (step, name), want in expected.items():
        key = act_name if name == "act" else name
        got = trial.tensor(key).value(step)
        ok = np.array_equal(got, want)  # the same tensor copied two ways: bit for bit
        print(
            f"step {step} {key}: {'OK' if ok else 'MISMATCH'} (max |diff| {np.abs(got - want).max():.3g})"
        )
        bad += not ok
    for reduction in ("taylor", "zero_fraction"):
        bad += check_reduction(dev, reduction)
    print("RESULT", "PASS" if bad == 0 else f"FAIL ({bad})")
    return 1 if bad else 0


def check_reduction(dev: torch.device, reduction: str) -> int:
    """Reduce-at-source on ``dev`` against numpy on synchronous copies; 1 on a mismatch.

    The hook reduces on the device (``act * grad`` averaged over H, W for taylor; the
    fraction of zeros for zero_fraction) before it copies; numpy computes the same from
    the full tensors, copied to the CPU independently, in float64.
    """
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).to(dev)
    seen: dict[str, np.ndarray] = {}

    def keep_grad(g: torch.Tensor) -> None:
        seen.setdefault("grad", g.cpu().numpy())

    def keep_first(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if "act" not in seen:
            seen["act"] = output.detach().cpu().numpy().astype(np.float64)
            output.register_hook(keep_grad)

    model.layer1[0].relu.register_forward_hook(keep_first)
    out = tempfile.mkdtemp() + f"/{reduction}.zarr"
    hook = tdump.Hook(out, include_regex=r"layer1\.0\.relu", reduction=reduction, strict=True)
    hook.register_module(model)
    loss_fn = nn.CrossEntropyLoss()
    hook.register_loss(loss_fn)
    x = torch.randn(16, 3, 64, 64, device=dev)
    y = torch.randint(0, 10, (16,), device=dev)
    loss_fn(model(x), y).backward()
    hook.close()
    act = seen["act"]
    if reduction == "taylor":
        name = "layer1.0.relu.output_0.taylor"
        want = (act * seen["grad"].astype(np.float64)).mean(axis=(2, 3))
    else:
        name = "layer1.0.relu.output_0"
        want = (act == 0).mean(axis=(2, 3))
    got = Trial(out).tensor(name).value(0)
    scale = float(np.abs(want).max()) or 1.0
    err = float(np.abs(got - want).max()) / scale
    ok = got.shape == want.shape and err < 1e-5  # float32 sums on the device against float64
    print(
        f"reduction {reduction} {name} {got.shape}: {'OK' if ok else 'MISMATCH'} "
        f"(max |diff| / max |value| {err:.2g})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
