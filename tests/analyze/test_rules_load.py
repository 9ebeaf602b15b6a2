"""Rules from files and parameters: what loads, and one-line errors for what does not."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from tdump.analyze import check
from tdump.analyze.rules import load_rule, parse_params
from tdump.errors import ConfigError, TdumpError
from tests.analyze.rules_helpers import tensor, write


@pytest.fixture
def dump(tmp_path: Path) -> str:
    path = str(tmp_path / "d.zarr")
    losses = [1.0, 0.8, float("nan"), 0.5]
    write(
        path,
        {
            "train": [
                (10 * i, {"loss.output_0": tensor("losses", np.float32(v), "loss")})
                for i, v in enumerate(losses)
            ]
        },
    )
    return path


def _file(tmp_path: Path, body: str, name: str = "my_rules.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


PLAIN = """
    import pathlib

    class LossAbove:
        # smdebug shape, no tdump base class: steps of every mode, values via the trial
        def __init__(self, trial, limit=0.9):
            self.trial = trial
            self.limit = limit

        def invoke_at_step(self, step):
            mode = getattr(self, "mode", None)  # set by check(mode=...) / --mode
            return float(self.trial.tensor("loss.output_0").value(step, mode=mode)) > self.limit

    class Boom:
        def __init__(self, trial, at=20):
            self.at = at

        def invoke_at_step(self, step):
            if step == self.at:
                raise ZeroDivisionError("division by zero in my rule")
            return False

    class NotARule:
        pass

    if __name__ == "__main__":
        pathlib.Path(__file__).with_suffix(".ran").write_text("main ran")
"""


def test_user_rule_file_plain_class(tmp_path: Path, dump: str) -> None:
    path = _file(tmp_path, PLAIN)
    firings = check(dump, [f"{path}:LossAbove"])
    assert [(f.rule, f.step, f.why) for f in firings] == [
        ("LossAbove", 0, "invoke_at_step returned True")
    ]
    assert [f.step for f in check(dump, [f"{path}:LossAbove"], params={"limit": 0.7})] == [0, 10]
    assert not Path(path).with_suffix(".ran").exists()  # imported, not run as __main__


def test_a_rule_that_raises_is_reported_and_the_others_go_on(tmp_path: Path, dump: str) -> None:
    path = _file(tmp_path, PLAIN)
    firings = check(dump, [f"{path}:Boom", "exploding_tensor"])
    errors = [f for f in firings if f.error]
    assert [(f.rule, f.step) for f in errors] == [("Boom", 20)]
    assert errors[0].why == "raised ZeroDivisionError: division by zero in my rule"
    assert [(f.rule, f.step) for f in firings if not f.error] == [("exploding_tensor", 20)]


def test_file_with_one_rule_needs_no_class_name(tmp_path: Path) -> None:
    one = _file(
        tmp_path,
        "class Only:\n    def invoke_at_step(self, step):\n        return False\n",
        "one.py",
    )
    assert load_rule(one).name == "Only"
    with pytest.raises(ConfigError, match=r"defines 2 rule classes \(LossAbove, Boom\); name one"):
        load_rule(_file(tmp_path, PLAIN))


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("BODY:Rule", "has a syntax error at line 3: "),
        ("RULES:Missing", "has no class 'Missing'; rule classes there: LossAbove, Boom"),
        ("RULES:NotARule", "class NotARule in "),
        (
            "nope_rule",
            "unknown rule 'nope_rule'; built-in rules: accuracy_drop, dead_relu, exploding_tensor",
        ),
        ("/no/such/rules.py:X", "no rule file at /no/such/rules.py"),
        ("IMPORT:X", "failed to import: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ],
)
def test_bad_rule_specs(tmp_path: Path, dump: str, spec: str, needle: str) -> None:
    files = {
        "BODY": _file(tmp_path, "x = 1\n\ndef broken(:\n    pass\n", "syntax.py"),
        "RULES": _file(tmp_path, PLAIN),
        "IMPORT": _file(tmp_path, "import no_such_module_xyz\n", "imp.py"),
    }
    for key, path in files.items():
        spec = spec.replace(key, path)
    with pytest.raises(ConfigError) as info:
        check(dump, [spec])
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    if "NotARule" in spec:
        assert "has no invoke_at_step(self, step) method" in msg


@pytest.mark.parametrize(
    ("rules", "params", "needle"),
    [
        (["dead_relu"], ["threshold"], "bad --param 'threshold'; write NAME=VALUE"),
        (["dead_relu"], ["=3"], "bad --param '=3'"),
        (["dead_relu"], ["a.b.c=3"], "bad --param 'a.b.c=3'"),
        (
            ["dead_relu"],
            ["threshold=1"],
            "--param threshold: no rule given takes it (dead_relu takes inactive_threshold",
        ),
        (
            ["dead_relu", "exploding_tensor"],
            ["nope.threshold=1"],
            "no rule 'nope' among the rules given (dead_relu, exploding_tensor)",
        ),
        (
            ["dead_relu", "exploding_tensor"],
            ["dead_relu.threshold=1"],
            "--param dead_relu.threshold: dead_relu takes",
        ),
        (
            ["vanishing_gradient"],
            ["threshold=abc"],
            "rule vanishing_gradient: parameter threshold must be a number, got 'abc'",
        ),
        (
            ["loss_not_decreasing"],
            ["window=0"],
            "parameter window must be a positive integer, got 0",
        ),
        (["loss_not_decreasing"], ["tensor=loss.outptu_0"], "did you mean 'loss.output_0'?"),
        (["dead_relu", "dead_relu"], [], "rule dead_relu given twice"),
        (
            ["exploding_tensor"],
            ["tensor_regex=(loss"],
            "rule exploding_tensor: invalid tensor regex '(loss'",
        ),
    ],
)
def test_bad_params(dump: str, rules: list[str], params: list[str], needle: str) -> None:
    with pytest.raises(TdumpError) as info:
        check(dump, rules, params=parse_params(params))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_params_scoped_and_shared(dump: str) -> None:
    parsed = parse_params(
        ["threshold=1e-3", 'exploding_tensor.tensor_regex="^loss"', "dead_relu.layer_threshold=0.9"]
    )
    assert parsed == {
        "threshold": 1e-3,
        "exploding_tensor.tensor_regex": "^loss",
        "dead_relu.layer_threshold": 0.9,
    }
    firings = check(dump, ["exploding_tensor", "vanishing_gradient", "dead_relu"], params=parsed)
    # the shared threshold reaches both rules that take one: every |loss| > 1e-3 fires
    assert [(f.rule, f.step) for f in firings] == [("exploding_tensor", s) for s in (0, 10, 20, 30)]
    assert firings[0].why == "loss.output_0: max |x| 1 > 0.001"
    assert firings[2].why == "loss.output_0: 1 NaN, 0 Inf"


def test_mode_applies_to_builtins_and_plain_classes(tmp_path: Path) -> None:
    path = str(tmp_path / "modes.zarr")
    ok, bad = np.float32(0.5), np.float32("nan")
    write(
        path,
        {
            "train": [(s, {"loss.output_0": tensor("losses", ok, "loss")}) for s in range(3)],
            "eval": [
                (s, {"loss.output_0": tensor("losses", bad if s == 1 else ok, "loss")})
                for s in range(3)
            ],
        },
    )
    assert check(path, ["exploding_tensor"]) == []  # train by default
    assert [(f.step, f.mode) for f in check(path, ["exploding_tensor"], mode="eval")] == [
        (1, "eval")
    ]
    rules = _file(tmp_path, PLAIN)
    # a plain class without a mode: every mode's steps (train 0..2 and eval 0..2 merged)
    assert [f.step for f in check(path, [f"{rules}:LossAbove"], params={"limit": 0.4})] == [0, 1, 2]
    # --mode sets its mode attribute: eval's NaN is not > 0.4, the others are
    hits = check(path, [f"{rules}:LossAbove"], params={"limit": 0.4}, mode="eval")
    assert [(f.step, f.mode) for f in hits] == [(0, "eval"), (2, "eval")]
