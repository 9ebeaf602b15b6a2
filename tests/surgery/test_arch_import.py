"""A model class in the user's training script (issue 8, defect 6): imported, never re-run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tdump.surgery as surgery
from tdump.errors import ConfigError

GUARDED = '''"""train.py: a model class and a training run under the main guard."""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
WIDTH = 6


class Net(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, WIDTH, 3)
        self.fc = nn.Linear(WIDTH, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def main() -> None:
    Path("TRAINED").write_text("the training ran")
    torch.save(Net().state_dict(), "ckpt.pt")


if __name__ == "__main__":
    main()
'''

UNGUARDED = GUARDED.replace('if __name__ == "__main__":\n    main()\n', "main()\n")
LOOPING = GUARDED.replace(
    'if __name__ == "__main__":\n    main()\n', "for epoch in range(2):\n    main()\n"
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m in ("mytrain", "badtrain") or "_tdump_user_" in m]:
        monkeypatch.delitem(sys.modules, name)
    (tmp_path / "mytrain.py").write_text(GUARDED)
    (tmp_path / "badtrain.py").write_text(UNGUARDED)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loops.py").write_text(LOOPING)
    return tmp_path


def test_user_class_without_running_training(project: Path) -> None:
    model = surgery.build_arch("mytrain.py:Net", {"num_classes": 5})
    assert model.fc.out_features == 5 and type(model).__name__ == "Net"
    assert type(surgery.build_arch("mytrain:Net")).__name__ == "Net"
    assert type(surgery.build_arch(str(project / "mytrain.py") + ":Net")).__name__ == "Net"
    assert not (project / "TRAINED").exists() and not (project / "ckpt.pt").exists()
    # a checkpoint of it round-trips when the user names the class again
    surgery.save(project / "m.pt", model, arch="mytrain.py:Net", arch_kwargs={"num_classes": 5})
    back = surgery.load(project / "m.pt", "mytrain.py:Net")
    torch.testing.assert_close(back.fc.weight, model.fc.weight, rtol=0, atol=0)
    assert not (project / "TRAINED").exists()


@pytest.mark.parametrize(
    ("arch", "line"),
    [("badtrain.py:Net", "main()"), ("badtrain:Net", "main()"), ("sub/loops.py:Net", "for epoch")],
)
def test_script_that_trains_on_import_gives_its_model_without_training(
    project: Path, arch: str, line: str
) -> None:
    """Only what Net needs runs (its imports, WIDTH, the sys.path set-up); the loop, the
    call to main() and the main guard do not, and load() says what was left out."""
    model = surgery.build_arch(arch, {"num_classes": 4})
    assert model.conv.out_channels == 6 and model.fc.out_features == 4  # WIDTH = 6 ran
    assert not (project / "TRAINED").exists() and not (project / "ckpt.pt").exists()
    surgery.save(project / "m.pt", model, arch=arch, arch_kwargs={"num_classes": 4})
    back = surgery.load(project / "m.pt", arch)
    torch.testing.assert_close(back.fc.weight, model.fc.weight, rtol=0, atol=0)
    (note,) = [n for n in surgery.provenance(back).notes if "runs code when imported" in n]
    shown = arch.rpartition(":")[0]
    assert note.startswith(
        f"{shown} runs code when imported; tdump ran only its imports and what Net needs"
    )
    assert line in note and not (project / "TRAINED").exists()


ARGPARSE = """import argparse
import torch
from torch import nn
from sklearn.datasets import load_digits

parser = argparse.ArgumentParser()
parser.add_argument("--width", type=int, default=5)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()
data = load_digits()
try:
    import not_a_module_anywhere as extra
except ImportError:
    extra = None
if args.epochs > 100:
    open("BRANCH", "w").write("a top-level if that calls ran")
torch.manual_seed(0)
torch.save(torch.zeros(1), "SAVED.pt")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, args.width, 3)
        self.extra = extra

    def forward(self, x):
        return self.conv(x)


model = Net()
for epoch in range(args.epochs):
    open("TRAINED", "w").write("trained")
"""


def test_model_reading_parsed_args_gets_the_parsers_defaults(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tutorial-style script (argparse, data and training at the top level): the parser
    and its add_argument calls run with the script's name alone as sys.argv, the data
    loading and training do not, and tdump's own argv is left as it was."""
    (project / "tutorial.py").write_text(ARGPARSE)
    monkeypatch.setattr(sys, "argv", ["tdump", "prune", "--count", "3"])
    model = surgery.build_arch("tutorial.py:Net")
    assert model.conv.out_channels == 5 and model.extra is None
    assert sys.argv == ["tdump", "prune", "--count", "3"]
    assert not (project / "TRAINED").exists() and not (project / "BRANCH").exists()
    assert not (project / "SAVED.pt").exists()  # a torch call, but not set-up: it writes
    module = sys.modules[type(model).__module__]
    assert not hasattr(module, "data") and not hasattr(module, "model")


def test_name_set_only_by_code_that_does_not_run_is_said_with_its_line(project: Path) -> None:
    """WIDTH comes from a with block, which is never run: building says where it is set."""
    (project / "withcfg.py").write_text(
        GUARDED.replace(
            "WIDTH = 6\n", "with open(__file__) as fh:\n    WIDTH = len(fh.readline())\n"
        )
    )
    with pytest.raises(ConfigError) as err:
        surgery.build_arch("withcfg.py:Net")
    text = str(err.value)
    assert "name 'WIDTH' is not defined" in text and "\n" not in text, text
    assert (
        "withcfg.py sets 'WIDTH' in code tdump does not run (line 9: with open(__file__) as fh:"
        in text
    )


def test_script_that_exits_while_defining_the_model_is_one_error(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A needed statement that exits (a required argument tdump cannot give): one line
    that quotes argparse's reason; its usage text is not printed around it."""
    (project / "strict.py").write_text(
        ARGPARSE.replace('"--width", type=int, default=5', '"--width", type=int, required=True')
    )
    with pytest.raises(ConfigError) as err:
        surgery.build_arch("strict.py:Net")
    assert str(err.value) == (
        "cannot import architecture 'strict.py:Net': running what Net needs from strict.py "
        "exited at line 9 (strict.py: error: the following arguments are required: --width): "
        "give what Net reads a default in the script, or put the model in its own module"
    )
    assert capsys.readouterr().err == ""
    assert not [m for m in sys.modules if m.startswith("_tdump_user_strict")]


@pytest.mark.parametrize(
    ("arch", "hint"), [("resnet1", "did you mean resnet18?"), ("foo", "import path like")]
)
def test_unknown_bare_arch_says_what_would_work(arch: str, hint: str) -> None:
    """A bare name is a registered builder or nothing: the error says so (and a near miss)."""
    from tdump.surgery._arch import resolve_arch

    with pytest.raises(ConfigError) as err:
        resolve_arch(arch, trusted=True)
    text = str(err.value)
    assert "\n" not in text and "neither a registered builder" in text and hint in text


def test_like_files_arch_is_named_with_the_fix_and_never_imported(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fine-tuned state_dict whose architecture comes from the --like checkpoint: the
    refusal names that file, and says the fix for the CLI and for Python (walk2 #5)."""
    import tdump
    from tdump.errors import CheckpointError
    from tests.cli.inproc import run_main
    from tests.surgery.helpers import random_scores, write_ranks

    model = surgery.build_arch("mytrain.py:Net")
    surgery.save("pruned.pt", model, arch="mytrain.py:Net")
    torch.save(model.state_dict(), "ft.pt")
    for name in [m for m in sys.modules if "_tdump_user_" in m]:
        del sys.modules[name]  # a fresh session: the user's script not imported yet
    fix = (
        "pass --arch mytrain.py:Net (in Python tdump.load('ft.pt', like='pruned.pt', arch=Net) "
        "with the class itself, or arch='mytrain.py:Net')"
    )
    with pytest.raises(CheckpointError) as err:
        tdump.load("ft.pt", like="pruned.pt")
    text = str(err.value)
    assert text.startswith("pruned.pt (--like) names architecture 'mytrain.py:Net'"), text
    assert fix in text and "\n" not in text
    with pytest.raises(CheckpointError) as err:
        tdump.load("pruned.pt")
    assert "in Python tdump.load('pruned.pt', arch=Net) with the class itself" in str(err.value)

    write_ranks(project / "ranks.parquet", random_scores(model))
    args = ["prune", "ft.pt", "ranks.parquet", "--like", "pruned.pt", "-o", "p2.pt", "--count", "2"]
    code, _, stderr = run_main(monkeypatch, capsys, *args)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("error: pruned.pt (--like) names architecture") and fix in lines[0]
    assert not (project / "p2.pt").exists() and not (project / "TRAINED").exists()
    assert not [m for m in sys.modules if "_tdump_user_" in m]  # nothing was imported
    # the fix the message gives works
    code, _, stderr = run_main(monkeypatch, capsys, *args, "--arch", "mytrain.py:Net")
    assert code == 0 and (project / "p2.pt").exists(), stderr


@pytest.mark.parametrize(
    ("arch", "said"),
    [
        (
            "mytrain.py:Nett",
            "mytrain.py has no class or function 'Nett'; did you mean Net? (--arch mytrain.py:Net)",
        ),
        ("mytrain:mian", "mytrain has no class or function 'mian'; did you mean main?"),
        ("mytrain.py:Zzz", "mytrain.py has no class or function 'Zzz'; it has Net, main"),
        ("torch.nn:Conv2", "torch.nn has no class or function 'Conv2'; did you mean Conv2d?"),
    ],
)
def test_mistyped_name_says_the_module_as_given_and_a_near_miss(
    project: Path, arch: str, said: str
) -> None:
    """No private module name (`_tdump_user_mytrain`) in the message (walk2 #3)."""
    with pytest.raises(ConfigError) as err:
        surgery.build_arch(arch)
    text = str(err.value)
    assert text.startswith(said) and "_tdump_user_" not in text and "\n" not in text, text
    assert not (project / "TRAINED").exists()


def test_weights_on_meta_only_for_the_building_thread() -> None:
    """The global registration hooks leave a model another thread builds meanwhile alone."""
    import threading

    from tdump.surgery._arch_fit import _weights_on_meta

    built: dict[str, torch.nn.Module] = {}
    started, release = threading.Event(), threading.Event()

    def other() -> None:
        started.wait()
        built["other"] = torch.nn.Linear(3, 2)
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with _weights_on_meta():
        built["own"] = torch.nn.Linear(3, 2)
        started.set()
        release.wait(10)  # the other thread builds while the hooks are installed
    thread.join()
    assert built["own"].weight.device.type == "meta"
    assert built["other"].weight.device.type == "cpu"
    assert torch.isfinite(built["other"].weight).all()
    assert torch.nn.Linear(3, 2).weight.device.type == "cpu"  # hooks gone afterwards


def test_own_class_saves_and_loads_without_importing_torchvision(project: Path) -> None:
    """A script whose model is its own never pays torchvision's import (2-3 s per stage)."""
    import subprocess

    code = """
import sys, torch, tdump, tdump.surgery as surgery
from mytrain import Net
surgery.save("own.pt", Net(), arch="mytrain.py:Net", arch_kwargs={"num_classes": 3})
assert type(tdump.load("own.pt", arch=Net)).__name__ == "Net"
assert type(surgery.load("own.pt", "mytrain.py:Net")).__name__ == "Net"
assert not surgery.is_registered_arch("mytrain.py:Net")
print(sorted(m for m in sys.modules if m.startswith("torchvision")))
surgery.register_arch("mytrain.py:Net", Net)  # a registered name needs no --arch
assert type(surgery.load("own.pt")).__name__ == "Net"
print(surgery.is_registered_arch("resnet18"), "torchvision.models" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["[]", "True True"]


def test_package_module_with_relative_imports_runs_only_what_net_needs(project: Path) -> None:
    """`--arch pkg.models:Net`: the slice keeps the package, so `from .blocks import` works."""
    (project / "pkg").mkdir()
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "blocks.py").write_text(
        "from torch import nn\n\n\ndef block(c):\n    return nn.Conv2d(1, c, 3)\n"
    )
    (project / "pkg" / "models.py").write_text(
        "from torch import nn\n\nfrom .blocks import block\n\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = block(7)\n\n\n"
        'open("TRAINED", "w").write("trained")\n'
    )
    model = surgery.build_arch("pkg.models:Net")
    assert model.conv.out_channels == 7 and not (project / "TRAINED").exists()


def test_two_scripts_of_one_name_in_two_folders_are_two_models(project: Path) -> None:
    """`a/train.py:Net` and `b/train.py:Net` in one process: each its own file's class."""
    for folder, width in (("a", 3), ("b", 5)):
        (project / folder).mkdir()
        (project / folder / "train.py").write_text(GUARDED.replace("WIDTH = 6", f"WIDTH = {width}"))
    assert surgery.build_arch("a/train.py:Net").conv.out_channels == 3
    assert surgery.build_arch("b/train.py:Net").conv.out_channels == 5
