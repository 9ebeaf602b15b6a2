"""Write and read ``ranks.parquet`` (format ``tdump.ranks`` version 1, ``docs/FORMAT.md`` §2).

Examples
--------
>>> import pandas as pd, tempfile, os
>>> df = pd.DataFrame({"layer": ["conv1", "conv1"], "channel": [0, 1], "score": [1.0, 3.0],
...                    "criterion": "l1", "steps": 1, "examples": 0, "sources": "conv1.weight",
...                    "mode": "train"})
>>> path = os.path.join(tempfile.mkdtemp(), "ranks.parquet")
>>> _ = write_ranks(normalize_scores(df), path, meta={"criterion": "l1", "normalize": True})
>>> back = read_ranks(path)
>>> back["score_norm"].round(4).tolist(), back.attrs["tdump"]["format"]
([0.3162, 0.9487], 'tdump.ranks')
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tdump._atomic import write_atomic
from tdump._protocols import require_protocol
from tdump._version import __version__
from tdump.errors import (
    ConfigError,
    DumpNotFoundError,
    FormatVersionError,
    RanksError,
    first_line,
)

if TYPE_CHECKING:  # pandas loads with the first table (tdump rank starts faster without it)
    import pandas as pd

__all__ = [
    "COLUMNS",
    "RANKS_FORMAT",
    "RANKS_VERSION",
    "RankTable",
    "no_ranks_file",
    "normalize_scores",
    "not_a_ranks_file",
    "read_ranks",
    "write_ranks",
]

RANKS_FORMAT = "tdump.ranks"
RANKS_VERSION = 1
_META_KEY = b"tdump"
#: Required columns and their dtypes (``object`` = str).
COLUMNS: dict[str, str] = {
    "layer": "object",
    "channel": "int64",
    "score": "float64",
    "score_norm": "float64",
    "criterion": "object",
    "steps": "int64",
    "examples": "int64",
    "sources": "object",
    "mode": "object",
}


def layer_normalized(score: np.ndarray, layer_codes: np.ndarray) -> np.ndarray:
    """``score`` / the L2 norm of its layer's scores; ``score`` itself where that norm is 0.

    ``layer_codes`` numbers the layers 0, 1, ... per row. NaN scores stay NaN and are
    left out of their layer's norm.

    >>> layer_normalized(np.array([3.0, 4.0, 0.0, 2.0]), np.array([0, 0, 1, 2])).tolist()
    [0.6, 0.8, 0.0, 1.0]
    """
    with np.errstate(invalid="ignore", over="ignore"):  # an Inf score (--keep-nan) gives NaN
        squares = np.where(np.isnan(score), 0.0, score * score)
        norms = np.sqrt(np.bincount(layer_codes, weights=squares))[layer_codes]
        return np.where(norms > 0, score / np.where(norms > 0, norms, 1.0), score)


def normalize_scores(df: pd.DataFrame, normalize: bool = True) -> pd.DataFrame:
    """Add ``score_norm``: ``score`` / L2 norm of its layer's scores (or ``score`` itself).

    A layer whose scores are all zero keeps ``score_norm == score``.
    """
    import pandas as pd

    out = df.copy()
    score = out["score"].to_numpy(dtype=np.float64)
    if normalize:
        codes, _ = pd.factorize(out["layer"])
        out["score_norm"] = layer_normalized(score, codes)
    else:
        out["score_norm"] = score
    return out


@dataclass(frozen=True)
class RankTable:
    """A ranks table as numpy columns, without pandas (``tdump rank`` never imports it).

    ``columns`` holds :data:`COLUMNS` in order (text columns as object arrays of
    ``str``); ``meta`` the ``tdump`` metadata. :meth:`to_frame` gives the DataFrame
    that :func:`~tdump.analyze.rank` returns, and :func:`write_ranks` writes either.

    Examples
    --------
    >>> t = RankTable.from_layers([("conv1", np.array([3.0, 4.0]), 2, 8, "a,a.grad")],
    ...                           criterion="taylor", mode="train", meta={"normalize": True})
    >>> t.columns["score_norm"].tolist(), t.weakest(1), len(t)
    ([0.6, 0.8], [0], 2)
    """

    columns: Mapping[str, np.ndarray]
    meta: Mapping[str, Any]

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[tuple[str, np.ndarray, int, int, str]],
        *,
        criterion: str,
        mode: str,
        meta: Mapping[str, Any],
        normalize: bool = True,
    ) -> RankTable:
        """Rows of ``(layer, scores, steps, examples, sources)``, one per ranked layer."""
        sizes = np.array([len(score) for _, score, *_ in layers], dtype=np.int64)

        def per_layer(values: Sequence[Any], dtype: Any) -> np.ndarray:
            return np.repeat(np.array(values, dtype=dtype), sizes)

        score = np.concatenate([np.zeros(0), *(np.asarray(x[1], np.float64) for x in layers)])
        codes = per_layer(range(len(layers)), np.int64)
        columns = {
            "layer": per_layer([x[0] for x in layers], object),
            "channel": np.concatenate([np.zeros(0, np.int64), *map(np.arange, sizes)]),
            "score": score,
            "score_norm": layer_normalized(score, codes) if normalize else score.copy(),
            "criterion": per_layer([criterion] * len(layers), object),
            "steps": per_layer([x[2] for x in layers], np.int64),
            "examples": per_layer([x[3] for x in layers], np.int64),
            "sources": per_layer([x[4] for x in layers], object),
            "mode": per_layer([mode] * len(layers), object),
        }
        return cls(columns, dict(meta))

    def __len__(self) -> int:
        return len(self.columns["channel"])

    def weakest(self, n: int) -> list[int]:
        """Rows of the ``n`` smallest finite ``score_norm`` (ties in table order)."""
        norm = self.columns["score_norm"]
        order = np.argsort(norm, kind="stable")
        return [int(i) for i in order[~np.isnan(norm[order])][:n]]

    def to_frame(self) -> pd.DataFrame:
        """The pandas DataFrame, metadata in ``df.attrs["tdump"]``."""
        import pandas as pd

        df = pd.DataFrame({name: self.columns[name] for name in COLUMNS})
        df.attrs["tdump"] = dict(self.meta)
        return df


def _coerce(df: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise RanksError(
            f"{where} lacks column(s) {', '.join(missing)}; it must have {', '.join(COLUMNS)}"
        )
    out = df.copy()
    for col, dtype in COLUMNS.items():
        try:
            out[col] = out[col].astype(str) if dtype == "object" else out[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise RanksError(f"{where}: column {col!r} is not {dtype} ({exc})") from None
    key = ["layer", "channel", "criterion"]  # a table may hold several criteria
    if out.duplicated(key).any():
        dup = out.loc[out.duplicated(key), key].iloc[0]
        raise RanksError(
            f"{where} ranks channel {dup['channel']} of {dup['layer']!r} twice for criterion "
            f"{dup['criterion']!r}; one row per (layer, channel, criterion)"
        )
    if (out["channel"] < 0).any():
        raise RanksError(f"{where} has negative channel indices")
    return out


def write_ranks(
    df: pd.DataFrame | RankTable,
    path: str | os.PathLike[str],
    *,
    meta: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the ranks table ``df`` to ``path`` as ``tdump.ranks`` version 1 parquet.

    ``df``: a DataFrame (:func:`~tdump.analyze.rank`'s, or one of your own with
    :data:`COLUMNS`) or a :class:`RankTable`. ``meta`` (criterion, normalize, dump,
    mode, steps) is merged over ``df.attrs["tdump"]`` (``RankTable.meta``); format,
    version, created and tdump_version are filled in. Returns ``path``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    # duck-typed: the CLI writes a RankTable and never imports pandas
    if not isinstance(df, RankTable) and not (hasattr(df, "columns") and hasattr(df, "attrs")):
        raise RanksError(
            f"write_ranks needs a ranks DataFrame (tdump.rank's) or a RankTable, "
            f"got a {type(df).__name__}"
        )
    path = os.fspath(path)
    if isinstance(df, RankTable):  # built to COLUMNS' types: no pandas needed
        info: dict[str, Any] = dict(df.meta)
        table = pa.Table.from_arrays(_arrow_columns(df.columns), names=list(COLUMNS))
        first_criterion = str(df.columns["criterion"][0]) if len(df) else None
    else:
        table_df = _coerce(df, "ranks table")
        info = dict(df.attrs.get("tdump") or {})
        cols = list(COLUMNS) + [c for c in table_df.columns if c not in COLUMNS]
        table = pa.Table.from_pandas(table_df[cols], preserve_index=False)
        first_criterion = str(table_df["criterion"].iloc[0]) if len(table_df) else None
    info.update(meta or {})
    info.setdefault("criterion", first_criterion)
    info.setdefault("normalize", True)
    info.setdefault("dump", None)
    info.setdefault("steps", None)
    info.update(
        format=RANKS_FORMAT,
        format_version=RANKS_VERSION,
        created=info.get("created")
        or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tdump_version=__version__,
    )
    existing = dict(table.schema.metadata or {})
    existing[_META_KEY] = json.dumps(info, default=_json_default).encode()
    table = table.replace_schema_metadata(existing)
    if "://" in str(path):
        import fsspec

        require_protocol(path)
        with fsspec.open(str(path), "wb", **dict(storage_options or {})) as fh:
            pq.write_table(table, fh)
        return str(path)
    from tdump.analyze._paths import check_output_path  # it reads ranks files: imports this

    check_output_path(path)
    # temporary file in the same folder, then rename: a failed write (disk full, quota,
    # interrupt) leaves an existing file at ``path`` as it was
    try:
        write_atomic(
            path,
            lambda fh: pq.write_table(table, fh),
            tmp_prefix=f".{os.path.basename(path)}.",
        )
    except OSError as exc:
        kept = "; the existing file is unchanged" if os.path.exists(path) else ""
        raise ConfigError(
            f"cannot write ranks to {path} ({exc.strerror or exc}){kept}; "
            "free space or choose another --out"
        ) from None
    return str(path)


def _arrow_columns(columns: Mapping[str, np.ndarray]) -> list[Any]:
    """pyarrow arrays of :data:`COLUMNS`, built from their buffers.

    Why not ``pa.array``: it imports pandas (0.35 s) to ask whether its input is a
    pandas object, which is all ``tdump rank`` would import pandas for.
    """
    import pyarrow as pa

    out = []
    for name, kind in COLUMNS.items():
        values = columns[name]
        if kind == "object":
            encoded = [str(v).encode() for v in values]
            offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
            buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
            out.append(pa.Array.from_buffers(pa.string(), len(encoded), buffers))
        else:
            data = np.ascontiguousarray(values, dtype=kind)
            arrow_type = pa.int64() if kind == "int64" else pa.float64()
            out.append(pa.Array.from_buffers(arrow_type, len(data), [None, pa.py_buffer(data)]))
    return out


def no_ranks_file(path: str | os.PathLike[str]) -> str:
    """What to say when there is no ranks file at ``path``.

    >>> no_ranks_file("r.parquet")
    'no ranks file at r.parquet; create one with `tdump rank DUMP -o r.parquet`'
    """
    return f"no ranks file at {path}; create one with `tdump rank DUMP -o {path}`"


def not_a_ranks_file(path: str) -> str | None:
    """``None`` if ``path`` is a ranks file (any format version), else what it is.

    Reads only the Parquet footer: this runs before the ranking, on every ``-o``
    that exists.
    """
    import pyarrow.parquet as pq

    if _is_torch_file(path):
        return "a torch checkpoint"
    try:
        raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    except Exception:  # pyarrow raises several types for files that are not Parquet
        return "not Parquet"
    try:
        info = json.loads(raw) if raw is not None else None
    except ValueError:
        info = None
    if isinstance(info, dict) and info.get("format") == RANKS_FORMAT:
        return None
    return "Parquet without tdump's ranks metadata"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _is_torch_file(path: str) -> bool:
    """Whether a local ``path`` starts like what ``torch.save`` writes (zip or pickle)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def read_ranks(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read and validate a ``ranks.parquet``; metadata lands in ``df.attrs["tdump"]``.

    Raises
    ------
    DumpNotFoundError
        No file at ``path``.
    RanksError
        Not a parquet file, no ``tdump`` metadata, wrong format name, missing columns.
    FormatVersionError
        Written by a newer format version.
    """
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if "://" not in str(path) and os.path.isdir(path):
        raise RanksError(
            f"{path} is a directory, not a ranks file; give the .parquet file `tdump rank -o` wrote"
        )
    try:
        if "://" in str(path):
            import fsspec

            require_protocol(path)
            with fsspec.open(str(path), "rb", **dict(storage_options or {})) as fh:
                table = pq.read_table(fh)
        else:
            table = pq.read_table(str(path))
    except FileNotFoundError:
        raise DumpNotFoundError(no_ranks_file(path)) from None
    except (OSError, ValueError) as exc:
        if _is_torch_file(path):
            raise RanksError(
                f"{path} is a torch checkpoint, not a ranks file; make one with "
                "`tdump rank DUMP -o ranks.parquet`"
            ) from None
        raise RanksError(
            f"{path} is not a readable parquet file ({first_line(exc, None)})"
        ) from None
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise RanksError(
            f"{path} has no tdump metadata; it was not written by `tdump rank` (tdump.analyze.write_ranks)"
        )
    try:
        info = json.loads(raw)
    except ValueError:
        raise RanksError(f"{path} has unreadable tdump metadata") from None
    if not isinstance(info, dict) or info.get("format") != RANKS_FORMAT:
        fmt = info.get("format") if isinstance(info, dict) else None
        raise RanksError(f"{path} holds format {fmt!r}, not {RANKS_FORMAT!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or version > RANKS_VERSION:
        raise FormatVersionError(
            f"{path} has ranks format version {version}, this tdump reads up to {RANKS_VERSION}; "
            "upgrade tdump (pip install -U tdump)"
        )
    df = _coerce(table.to_pandas(), str(path))
    df.attrs["tdump"] = info
    return df
