"""``tdump loop --mlflow``: each round as an MLflow run (the ``mlflow`` extra).

The tracking server comes from ``MLFLOW_TRACKING_URI`` (MLflow's own rule: unset
means a local ``./mlruns``). The MLflow experiment is named after the experiment
directory; each round's run holds the loop's settings as params, the round's
numbers as metrics, the figure so far and the round's pruned checkpoint as
artifacts.

Examples
--------
>>> log_round(Experiment.open("exp"), row, settings)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from tdump.errors import ConfigError
from tdump.loop._experiment import Experiment
from tdump.loop._settings import LoopSettings

__all__ = ["METRICS", "log_round", "mlflow_experiment_name"]

#: Row fields logged as MLflow metrics (when numbers).
METRICS = (
    "params",
    "flops",
    "params_ratio",
    "flops_ratio",
    "accuracy",
    "loss",
    "accuracy_drop",
    "train_accuracy",
    "train_loss",
    "eval_accuracy",
    "eval_loss",
    "removed",
)


def mlflow_experiment_name(exp: Experiment) -> str:
    """``tdump/<experiment folder name>``."""
    return f"tdump/{exp.path.resolve().name}"


def log_round(exp: Experiment, row: dict[str, Any], settings: LoopSettings) -> str:
    """Log round ``row`` of ``exp`` as one MLflow run; returns the run id."""
    try:
        import mlflow
    except ImportError:
        raise ConfigError("--mlflow needs mlflow: pip install 'tdump[mlflow]'") from None
    mlflow.set_experiment(mlflow_experiment_name(exp))
    r = int(row["round"])
    params = {
        "round": r,
        "script": " ".join(settings.target()),  # -m pkg.train for a module
        "train_args": " ".join(settings.train_args)[:500],
        "criterion": settings.criterion,
        "count": settings.count,
        "ratio": settings.ratio,
        "scope": settings.scope,
        "rounds": settings.rounds,
        "stop_when": settings.stop_when,
        "experiment_dir": str(exp.path.resolve()),
    }
    metrics = {k: float(row[k]) for k in METRICS if isinstance(row.get(k), (int, float))}
    for stage, seconds in (row.get("wall") or {}).items():
        metrics[f"wall_{stage}"] = float(seconds)
    with mlflow.start_run(run_name=f"round {r}") as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        mlflow.log_metrics(metrics, step=r)
        mlflow.set_tags({"tdump.round": str(r), "tdump.stop_reason": row.get("stop_reason") or ""})
        ckpt = exp.path / str(row["checkpoint"])
        if ckpt.exists():
            mlflow.log_artifact(str(ckpt), artifact_path="checkpoint")
        mlflow.log_artifact(str(exp.path / "rounds.jsonl"))
        try:
            from tdump.loop._plot import plot_rounds

            with tempfile.TemporaryDirectory() as tmp:
                png = os.path.join(tmp, "curve.png")
                plot_rounds([(exp.path.name, exp.rows())], png, title=exp.path.name)
                mlflow.log_artifact(png)
        except ConfigError:  # matplotlib not installed: the run goes without its figure
            pass
        return str(run.info.run_id)
