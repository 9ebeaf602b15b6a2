"""A model under a hook can be pickled and deep-copied; the copies record nothing."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from tdump._format import StoreReader
from tdump.capture import Hook


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _pickled(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_saved_and_copied_models_run_without_recording(tmp_path: Path) -> None:
    out = str(tmp_path / "d.zarr")
    model, crit = _model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)

    def step(m: nn.Module, c: nn.Module) -> None:
        opt.zero_grad()
        c(m(x), y).backward()
        opt.step()

    with Hook(out, include_regex=".*", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        hook.register_loss(crit)
        step(model, crit)
        step(model, crit)  # step 1 in progress: its gradient hooks are still attached
        loaded, loaded_crit = _pickled(model), _pickled(crit)  # torch.save(model) works
        ema, ema_crit = copy.deepcopy(model), copy.deepcopy(crit)
        for m, c in ((loaded, loaded_crit), (ema, ema_crit)):
            assert isinstance(m, nn.Module) and isinstance(c, nn.Module)
            for k, v in model.state_dict().items():
                torch.testing.assert_close(m.state_dict()[k], v)
            c(m(x), y).backward()  # an EMA copy evaluated, a reloaded model fine-tuned
            with torch.no_grad():
                m.eval()(x)
        assert hook.steps() == {"train": 2, "eval": 0, "predict": 0}  # the copies: no steps
        step(model, crit)  # the original still records
    r = StoreReader(out)
    assert r.modes() == ["train"] and r.steps("train").tolist() == [0, 1, 2]
    # the copied criterion added no second loss call to step 1
    assert [n for n in r.tensor_names("train") if n.startswith("loss.output")] == ["loss.output_0"]
    assert r.saved_records("train", "0.weight.grad").tolist() == [0, 1, 2]


#: Loads a whole-model pickle where ``import tdump`` fails, trains it one step, and
#: counts the calls of its (disarmed) hooks through the audit event they raise.
_LOAD_WITHOUT_TDUMP = """
import sys
sys.modules["tdump"] = None  # any import of tdump, or of a module under it, fails
import pytest
import torch
events = []
sys.addaudithook(lambda name, args: events.append(name) if name == "tdump.disarmed_hook" else None)
model, x, y = torch.load(sys.argv[1], weights_only=False)
out = model(x)
torch.nn.functional.cross_entropy(out, y).backward()
try:
    import tdump  # noqa
except ImportError:
    print("no tdump", len(events), out.sum().item())
"""


def test_a_whole_model_saved_under_capture_loads_where_tdump_is_not_installed(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    model, saved = _model(), tmp_path / "model.pt"
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    with Hook(str(tmp_path / "d.zarr"), include_regex=".*", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        model(x).sum().backward()  # hooks on every module, gradient hooks attached
        torch.save((model, x, y), saved)
        with torch.no_grad():
            expected = model(x).sum().item()
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_TDUMP, str(saved)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    word, events, total = proc.stdout.strip().rsplit(" ", 2)
    assert word == "no tdump"
    assert int(events) > 0  # the disarmed hooks ran, in forward and backward ...
    assert float(total) == pytest.approx(expected, rel=1e-6)  # ... and left outputs alone
