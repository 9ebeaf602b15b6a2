"""ranks.parquet: writing (from a DataFrame or a RankTable), reading, one-line errors for bad files."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tdump.analyze import RankTable, read_ranks, write_ranks
from tdump.analyze._ranks_io import COLUMNS, normalize_scores
from tdump.errors import DumpNotFoundError, FormatVersionError, RanksError


def _table() -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "layer": ["a.conv", "a.conv", "b.conv"],
            "channel": [0, 1, 0],
            "score": [3.0, 4.0, 0.0],
            "criterion": "l1",
            "steps": 1,
            "examples": 0,
            "sources": "x",
            "mode": "train",
        }
    )
    return normalize_scores(df)


def _write_raw(path, df: pd.DataFrame, meta: dict | None) -> None:  # type: ignore[no-untyped-def]
    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta is not None:
        table = table.replace_schema_metadata({b"tdump": json.dumps(meta).encode()})
    pq.write_table(table, path)


def test_normalize() -> None:
    df = _table()
    assert df["score_norm"].tolist() == [0.6, 0.8, 0.0]
    assert normalize_scores(df, normalize=False)["score_norm"].tolist() == [3.0, 4.0, 0.0]


def test_roundtrip_and_meta(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.parquet"
    write_ranks(_table(), path, meta={"criterion": "l1", "normalize": True, "dump": "d.zarr"})
    back = read_ranks(str(path))
    assert back["score_norm"].tolist() == [0.6, 0.8, 0.0]
    raw = json.loads(pq.read_schema(path).metadata[b"tdump"])
    assert raw["format"] == "tdump.ranks" and raw["format_version"] == 1
    assert {"criterion", "normalize", "dump", "steps", "created", "tdump_version"} <= set(raw)


@pytest.mark.parametrize(
    ("meta", "drop", "error", "match"),
    [
        (None, None, RanksError, "no tdump metadata"),
        ({"format": "tdump.store", "format_version": 1}, None, RanksError, "not 'tdump.ranks'"),
        ({"format": "tdump.ranks", "format_version": 2}, None, FormatVersionError, "version 2"),
        ({"format": "tdump.ranks", "format_version": 1}, "score_norm", RanksError, "score_norm"),
    ],
)
def test_bad_files(tmp_path, meta, drop, error, match) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.parquet"
    df = _table()
    _write_raw(path, df.drop(columns=[drop]) if drop else df, meta)
    with pytest.raises(error, match=match) as exc:
        read_ranks(path)
    assert "\n" not in str(exc.value)


def test_not_parquet_and_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "x.parquet"
    bad.write_text("hello")
    with pytest.raises(RanksError, match="not a readable parquet"):
        read_ranks(bad)
    with pytest.raises(DumpNotFoundError, match="no ranks file"):
        read_ranks(tmp_path / "missing.parquet")


def test_duplicates_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    df = pd.concat([_table(), _table()])
    with pytest.raises(RanksError, match="twice"):
        write_ranks(df, tmp_path / "d.parquet")


def test_normalize_leaves_nan_out_of_the_layer_norm() -> None:
    df = _table()
    df.loc[0, "score"] = float("nan")
    got = normalize_scores(df)["score_norm"].tolist()
    assert pd.isna(got[0]) and got[1:] == [1.0, 0.0]  # a.conv's norm is 4 (the NaN left out)


def test_rank_table_writes_the_same_file_as_its_frame(tmp_path) -> None:  # type: ignore[no-untyped-def]
    layers = [
        ("b.conv", np.array([2.0, float("nan"), 1.0]), 3, 12, "b.act,b.act.grad"),
        ("a.conv", np.array([0.0, 0.0]), 3, 12, "a.act,a.act.grad"),
        ("é.conv", np.array([5.0]), 3, 12, "é,é.grad"),  # non-ASCII names survive the bytes
    ]
    meta = {"criterion": "taylor", "normalize": True, "dump": "d.zarr", "mode": "train"}
    table = RankTable.from_layers(layers, criterion="taylor", mode="train", meta=meta)
    frame = table.to_frame()
    assert list(frame.columns) == list(COLUMNS) and len(table) == 6
    # numpy reference: each layer's scores over their L2 norm (NaN left out), 0-norm kept
    norms = [np.sqrt(4.0 + 1.0)] * 3 + [0.0, 0.0] + [5.0]
    raw = np.concatenate([s for _, s, *_ in layers])
    want = np.array([r / n if n > 0 else r for r, n in zip(raw, norms, strict=True)])
    np.testing.assert_array_equal(frame["score_norm"].to_numpy(), want)
    assert table.weakest(3) == [3, 4, 2]  # NaN never among the weakest; ties in table order
    from_table = read_ranks(write_ranks(table, tmp_path / "t.parquet"))
    from_frame = read_ranks(write_ranks(frame, tmp_path / "f.parquet"))
    pd.testing.assert_frame_equal(from_table, from_frame)
    pd.testing.assert_frame_equal(from_table, _coerced(frame))
    for df in (from_table, from_frame):
        df.attrs["tdump"].pop("created")
    assert from_table.attrs == from_frame.attrs


def _coerced(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype({c: (str if t == "object" else t) for c, t in COLUMNS.items()})


def test_write_ranks_refuses_what_is_not_a_table(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RanksError, match=r"needs a ranks DataFrame .* got a dict"):
        write_ranks({"a": 1}, tmp_path / "r.parquet")  # type: ignore[arg-type]
    assert not (tmp_path / "r.parquet").exists()
