"""What a criterion's error or note tells a user, on small dumps recorded with tdump.Hook.

Each hint must name the real cause (eval steps have no gradients, the dump's reduction)
and a remedy capture accepts: these tests follow the remedy and check that it works.
"""

from __future__ import annotations

import numpy as np
import pytest

from tdump.analyze import rank_table
from tdump.capture import REDUCTIONS
from tdump.errors import ConfigError, MissingTensorError
from tests.analyze.rank_helpers import record_small

EVAL_TAYLOR = (
    "taylor needs gradients, which eval steps never have: rank --mode train, "
    "or use -c l1 / apoz / bn-gamma for eval"
)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`tdump record`'s selection: 4 train steps with gradients, then 1 eval step."""
    return record_small(str(tmp_path_factory.mktemp("hints") / "full.zarr"))


@pytest.fixture(scope="module")
def taylor_terms(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `tdump loop` records for taylor: the ReLUs' Taylor terms only."""
    path = str(tmp_path_factory.mktemp("hints") / "taylor.zarr")
    return record_small(path, reduction="taylor", include_regex=".*relu")


@pytest.fixture(scope="module")
def abs_mean(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("hints") / "absmean.zarr")
    return record_small(path, reduction="abs_mean")


def _error(dump: str, **kw: object) -> str:
    with pytest.raises(MissingTensorError) as exc:
        rank_table(dump, progress=False, **kw)  # type: ignore[arg-type]
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_eval_mode_says_eval_steps_have_no_gradients(full: str) -> None:
    assert _error(full, mode="eval") == EVAL_TAYLOR
    assert _error(full, mode="eval", criterion="taylor-weight").startswith(
        "taylor-weight needs gradients, which eval steps never have: rank --mode train"
    )
    # the remedies it names work on this very dump
    assert len(rank_table(full, progress=False)) == 10
    for crit in ("l1", "apoz", "bn-gamma"):
        assert len(rank_table(full, mode="eval", criterion=crit, progress=False)) == 10


def test_eval_mode_on_a_taylor_term_dump(taylor_terms: str) -> None:
    assert _error(taylor_terms, mode="eval") == EVAL_TAYLOR


def test_eval_mode_without_train_gradients_says_to_record_them(tmp_path: object) -> None:
    path = record_small(
        f"{tmp_path}/nograd.zarr", include_regex=r".*relu\d\.output_0$", include_activations=False
    )
    msg = _error(path, mode="eval")
    assert "eval steps never have" in msg and "record them in train steps" in msg
    assert "rank --mode train" in msg
    # and in train mode the classic "record the gradients" hint stays
    assert "no gradients for 'relu1.output_0'" in _error(path)


def test_apoz_on_taylor_terms_names_the_reduction(taylor_terms: str) -> None:
    for layers in (None, "conv1"):  # with --layers too: no "record --include" note instead
        msg = _error(taylor_terms, criterion="apoz", layers=layers)
        assert msg.startswith(
            "this dump stores only taylor terms (reduction='taylor'); apoz needs full activations"
        )
        assert "tdump loop --full-tensors" in msg
    assert len(rank_table(taylor_terms, progress=False)) == 10  # what the dump is for


def test_reduced_dump_hints_recommend_only_what_capture_accepts(abs_mean: str) -> None:
    apoz = _error(abs_mean, criterion="apoz")
    assert "reduction='abs_mean'" in apoz and "apoz needs full activations" in apoz
    taylor = _error(abs_mean)
    assert "reduction='abs_mean'" in taylor and """--config '{"reduction": "taylor"}'""" in taylor
    assert "reduction='zero_fraction'" in apoz and "zero_fraction" in REDUCTIONS
    # weights are never reduced: the weight criteria rank such a dump
    assert len(rank_table(abs_mean, criterion="l1", progress=False)) == 10


def test_one_step_note_says_untrained_only_for_train_step_0(full: str) -> None:
    ev = rank_table(full, mode="eval", criterion="apoz", progress=False)
    assert ev.meta["notes"] == [
        "apoz scores rest on one saved step (eval step 0); save more steps "
        "(a smaller --interval when recording) for scores that reflect training"
    ]
    tr = rank_table(full, criterion="apoz", steps="0", progress=False)
    assert "(step 0, the untrained model)" in tr.meta["notes"][0]


def test_ignored_workers_is_a_note(full: str) -> None:
    table = rank_table(full, scheduler="sync", workers=4, progress=False)
    assert (
        "--workers 4 ignored: the sync scheduler runs one task at a time" in table.meta["notes"][0]
    )
    assert rank_table(full, scheduler="threads", workers=2, progress=False).meta["notes"] == []


def test_unknown_criterion_names_the_plugin_group(full: str) -> None:
    with pytest.raises(ConfigError, match=r"entry-point group 'tdump\.criteria'") as exc:
        rank_table(full, criterion="mean-abs-ac", progress=False)
    assert "\n" not in str(exc.value) and "taylor, taylor-signed" in str(exc.value)


def test_zero_fraction_at_source_ranks_apoz_as_full_tensors_do(full: str, tmp_path: object) -> None:
    """The remedy apoz names: reduction='zero_fraction' stores (batch, channel), same scores."""
    path = record_small(f"{tmp_path}/zf.zarr", reduction="zero_fraction")
    want = rank_table(full, criterion="apoz", progress=False)
    got = rank_table(path, criterion="apoz", progress=False)
    assert list(got.columns["layer"]) == list(want.columns["layer"])
    np.testing.assert_allclose(got.columns["score"], want.columns["score"], rtol=1e-6)
    from tdump._format import StoreReader

    r = StoreReader(path)
    assert r.array("train", "relu1.output_0").ndim == 3  # record, batch, channel
    assert not any(n.endswith(".output_0.grad") for n in r.tensor_names("train"))
