"""Trial: smdebug-style calls return what was written."""

from __future__ import annotations

import numpy as np
import pytest

from tdump.analyze import Trial
from tdump.errors import ConfigError, MissingTensorError, SelectionError
from tests.conftest import SmallDump, append_train, make_bad_path, write_small_dump


def test_names_steps_modes(small_dump: SmallDump) -> None:
    trial = Trial(small_dump.path)
    assert trial.modes() == ["train", "eval"]
    assert trial.steps(mode="train") == [0, 10, 20]
    assert trial.steps(mode="eval") == [0, 5]
    assert trial.steps() == [0, 5, 10, 20]
    assert trial.tensor_names(mode="train") == small_dump.names("train")
    assert trial.tensor_names(mode="eval") == small_dump.names("eval")
    assert trial.tensor_names(regex=r"relu") == [
        "relu.output_0",
        "relu.output_0.grad",
        "relu.output_1",
    ]
    assert trial.tensor_names(collection="weights") == ["conv1.weight"]
    assert trial.tensor_names(regex="output", collection="losses") == ["loss.output_0"]
    assert trial.tensor_names(regex="nothing-like-this") == []
    assert trial.collections()["biases"] == ["conv1.bias"]
    assert trial.modules["conv1"]["params"]["weight"] == [4, 1, 3, 3]
    assert trial.config["save_interval"] == 10
    assert "Trial(" in repr(trial)


def test_values_equal_what_was_written(small_dump: SmallDump) -> None:
    trial = Trial(small_dump.path)
    for (mode, name, step), value in small_dump.values.items():
        got = trial.tensor(name).value(step, mode=mode)
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=f"{mode} {name} {step}")


def test_partial_batch_is_trimmed(small_dump: SmallDump) -> None:
    t = Trial(small_dump.path).tensor("relu.output_0")
    assert t.value(10, mode="train").shape == (4, 4, 6, 6)
    assert t.value(20, mode="train").shape == (2, 4, 6, 6)
    assert t.shape("train") == (4, 4, 6, 6)
    assert t.dims() == ("batch", "channel", "y", "x")
    assert t.dtype() == np.float32


def test_tensor_steps_only_where_saved(small_dump: SmallDump) -> None:
    trial = Trial(small_dump.path)
    assert trial.tensor("scalars.lr").steps() == [0, 20]
    assert trial.tensor("relu.output_0").steps() == [0, 5, 10, 20]
    assert trial.tensor("relu.output_0").steps(mode="eval") == [0, 5]
    assert trial.tensor("relu.output_0").modes() == ["train", "eval"]
    assert trial.tensor("conv1.weight").collection == "weights"
    # integer zeros are data (zero is the fill value of integer arrays)
    assert trial.tensor("scalars.epoch").steps() == [0, 10, 20]
    with pytest.raises(
        MissingTensorError, match=r"no value at step 10.*nearest saved steps: \[0, 20\]"
    ):
        trial.tensor("scalars.lr").value(10)
    values = trial.tensor("conv1.bias").values()
    assert sorted(values) == [0, 10, 20]


def test_scalars(small_dump: SmallDump) -> None:
    trial = Trial(small_dump.path)
    assert trial.scalar("lr") == {0: pytest.approx(0.1), 20: pytest.approx(0.1 / 3)}
    assert trial.scalar("scalars.epoch", mode="train") == {0: 0.0, 10: 0.0, 20: 0.0}
    assert trial.scalar("loss.output_0", mode="eval").keys() == {0, 5}
    with pytest.raises(ConfigError, match="not a scalar"):
        trial.scalar("conv1.bias")


def test_refresh_sees_new_records(tmp_path: object) -> None:
    dump = write_small_dump(f"{tmp_path}/live.zarr", train_steps=(0, 10))
    trial = Trial(dump.path)
    assert trial.steps(mode="train") == [0, 10]
    append_train(dump, 20)
    assert trial.steps(mode="train") == [0, 10]  # fixed until refresh
    trial.refresh()
    assert trial.steps(mode="train") == [0, 10, 20]
    np.testing.assert_array_equal(
        trial.tensor("relu.output_1").value(20, mode="train"),
        dump.values[("train", "relu.output_1", 20)],
    )


def test_urls(memory_dump: SmallDump, small_dump: SmallDump) -> None:
    for path, dump in ((memory_dump.path, memory_dump), ("file://" + small_dump.path, small_dump)):
        trial = Trial(path)
        np.testing.assert_array_equal(
            trial.tensor("conv1.weight").value(10), dump.values[("train", "conv1.weight", 10)]
        )


def test_one_line_errors(small_dump: SmallDump) -> None:
    trial = Trial(small_dump.path)
    with pytest.raises(
        MissingTensorError, match=r"no tensor 'conv1.wieght'.*did you mean 'conv1\.weight'\?"
    ) as e:
        trial.tensor("conv1.wieght")
    assert "\n" not in str(e.value)
    with pytest.raises(MissingTensorError, match="not stored for mode 'eval'"):
        trial.tensor("conv1.weight").value(0, mode="eval")
    with pytest.raises(MissingTensorError, match="has no saved 'predict' steps"):
        trial.steps(mode="predict")
    with pytest.raises(ConfigError, match="unknown mode 'test'"):
        trial.steps(mode="test")
    with pytest.raises(SelectionError, match="invalid regex"):
        trial.tensor_names(regex="relu(")


@pytest.mark.parametrize("kind", ["missing", "not_a_dump", "plain_zarr", "newer"])
def test_bad_paths(tmp_path: object, kind: str) -> None:
    path, exc = make_bad_path(str(tmp_path), kind)
    with pytest.raises(exc) as e:
        Trial(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_typos_and_wrong_types_are_one_line_config_errors(small_dump: SmallDump) -> None:
    """A misspelt collection or mode raises (never an empty list); so do wrong types."""
    trial = Trial(small_dump.path)
    t = trial.tensor("conv1.weight")
    cases = [
        (
            lambda: trial.tensor_names(collection="weight"),
            r"unknown collection 'weight'; .*'weights'\?",
        ),
        (lambda: trial.tensor_names(mode="evl"), r"unknown mode 'evl'; .*did you mean 'eval'\?"),
        (lambda: trial.steps(mode="evl"), r"unknown mode 'evl'; .*did you mean 'eval'\?"),
        (lambda: trial.calls("evl"), r"unknown mode 'evl'; .*did you mean 'eval'\?"),
        (lambda: t.value(10, mode="evl"), r"unknown mode 'evl'; .*did you mean 'eval'\?"),
        (lambda: trial.tensor(None), r"tensor name must be a str .*got NoneType None"),
        (lambda: t.value("10"), r"step must be a step number \(an int\), got str '10'"),
        (lambda: t.value(2.5), r"got float 2.5"),
        (lambda: Trial(42), r"the dump must be a path or URL \(str or os.PathLike\), got int 42"),
    ]
    for call, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as exc:
            call()  # type: ignore[no-untyped-call]
        assert "\n" not in str(exc.value)
    # a collection tdump records but this dump lacks is just empty; whole floats are steps
    assert trial.tensor_names(collection="running_stats") == []
    assert trial.calls("predict") == []
    np.testing.assert_array_equal(
        t.value(10.0, mode="train"), small_dump.values[("train", "conv1.weight", 10)]
    )
