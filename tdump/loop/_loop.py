"""The iterative pruning loop: train under capture -> rank -> prune -> fine-tune -> ...

Round 0 runs the training script under ``tdump record``. Round ``r > 0`` ranks round
``r-1``'s dump (``tdump rank``), prunes round ``r-1``'s model (``tdump prune``) and
fine-tunes the pruned model under ``tdump record``; each is a process of its own. The
loop then measures the round in-process (``measure``: the model's size from its
checkpoint, the metrics from its dump), writes its row and decides whether to stop.

Each stage writes under a ``.partial`` name and renames when it succeeded; the state
file says which stages are complete, so :func:`run_loop` with ``resume=True``
continues a loop killed at any moment from the last completed stage, discarding only
what the interrupted stage left.

Examples
--------
>>> settings = LoopSettings("train.py", ["--epochs", "1", "--out", "{out}"], rounds=4, count=200)
>>> rows = run_loop(settings, "exp")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from tdump.errors import CheckpointError, LoopError, TdumpError
from tdump.loop._events import LoopEvents
from tdump.loop._experiment import Experiment, arch_needed, check_start
from tdump.loop._replay import checkpoint_command, save_round_checkpoint, script_importable
from tdump.loop._resume import prepare_resume, resume_hint
from tdump.loop._row import round_row
from tdump.loop._settings import LoopSettings, record_options
from tdump.loop._stages import (
    StageResult,
    for_the_loop,
    prune_removed,
    rel_path,
    remove_path,
    remove_write_leftovers,
    run_stage,
    shown,
    stage_notes,
    substitute,
    tdump_argv,
)
from tdump.loop._stop import stop_reason

__all__ = ["LoopEvents", "run_loop"]

#: How commands.sh adds the stages' PYTHONPATH to the one the shell has.
_PYTHONPATH = "${PYTHONPATH:+:$PYTHONPATH}"
#: commands.sh's block for a training's environment, logged before the training's own
_TRAIN_ENV = "train (environment)"


class _Loop:
    def __init__(self, exp: Experiment, s: LoopSettings, events: LoopEvents) -> None:
        self.exp, self.s, self.events = exp, s, events
        self.state = exp.state()
        self.rows = exp.rows()
        folder = s.folder()
        path = os.environ.get("PYTHONPATH")
        self.env = {"PYTHONPATH": folder + (os.pathsep + path if path else "")}
        self.relayed: set[tuple[str, str]] = set()  # (stage, line): said once per loop run
        self.logged: set[int] = set()  # rounds with a line in commands.sh from this run

    # ------------------------------------------------------------------ state
    def _save_state(self, **changes: Any) -> None:
        self.state.update(changes)
        self.exp.write_state(self.state)

    def _fail(self, r: int, stage: str, message: str, code: int = 1) -> LoopError:
        where = f"round {r} {stage}"
        error = message if message.startswith(where) else f"{where}: {message}"
        self._save_state(status="failed", running=None, error=error)
        return LoopError(message, exit_code=code)

    # ------------------------------------------------------------------ paths
    def paths(self, r: int) -> dict[str, Path]:
        d = self.exp.round_dir(r)
        return {
            "dir": d,
            "ranks": d / "ranks.parquet",
            "init": d / "init.pt",
            "dump": d / "dump.zarr",
            "model": d / "model.pt",
            "checkpoint": d / "checkpoint.pt",
        }

    def _partial(self, path: Path) -> Path:
        return path.with_name(f"{path.stem}.partial{path.suffix}")

    def _outputs(self, r: int, stage: str) -> list[Path]:
        p = self.paths(r)
        return {
            "rank": [p["ranks"]],
            "prune": [p["init"]],
            "train": [p["dump"], p["model"]],
            "measure": [p["checkpoint"]],
        }[stage]

    # ------------------------------------------------------------------ stages
    def _run(self, r: int, stage: str, argv: list[str]) -> StageResult:
        p = self.paths(r)
        self.events.stage_started(r, stage, shown(argv))
        result = run_stage(argv, p["dir"] / f"{stage}.log", env=self._stage_env(r, stage))
        if result.code != 0:
            log = rel_path(p["dir"] / f"{stage}.log")
            raise self._fail(
                r,
                stage,
                f"round {r} {stage} failed (exit {result.code}): {result.error_line()} (log: {log})",
                result.code,
            )
        return result

    def _completed(
        self, r: int, stage: str, argv: list[str], moves: list[tuple[Path, Path]]
    ) -> None:
        """Rename the stage's outputs into place and list it in commands.sh (what completed
        only, so that ``sh commands.sh`` redoes the experiment)."""
        for a, b in moves:
            os.replace(a, b)
        if stage == "train":
            env_line = " ".join(f"{k}={v}" for k, v in self.train_env(r).items())
            self._log(r, _TRAIN_ENV, [f"export {env_line}"])
        self._log(r, stage, [shown(argv)] + [f"mv {rel_path(a)} {rel_path(b)}" for a, b in moves])

    def _log(self, r: int, stage: str, lines: list[str]) -> None:
        """Append a completed stage's lines to commands.sh, after what a rerun in an
        empty folder needs first: the stages' PYTHONPATH (--arch mynets.Net), the round's
        folder (each once per run of the loop)."""
        if not self.logged:
            folder = shlex.quote(self.env["PYTHONPATH"].split(os.pathsep)[0])
            self.exp.log_command(r, "environment", [f"export PYTHONPATH={folder}{_PYTHONPATH}"])
        if r not in self.logged:
            self.logged.add(r)
            lines = [f"mkdir -p {shlex.quote(rel_path(self.paths(r)['dir']))}", *lines]
        self.exp.log_command(r, stage, lines)

    def _stage_env(self, r: int, stage: str) -> dict[str, str]:
        env = dict(self.env)
        if stage == "train":
            env.update(self.train_env(r))
        return env

    def train_env(self, r: int) -> dict[str, str]:
        out = str(self._partial(self.paths(r)["model"]))
        return {"TDUMP_OUT": out, "TDUMP_ROUND": str(r), "TDUMP_INIT": self.init_of(r) or ""}

    def init_of(self, r: int) -> str | None:
        if r > 0:
            return str(self.paths(r)["init"])
        return os.path.abspath(self.s.init) if self.s.init else None

    def stage_rank(self, r: int) -> StageResult:
        p, prev = self.paths(r), self.paths(r - 1)
        tmp = self._partial(p["ranks"])
        argv = tdump_argv(
            "rank", rel_path(prev["dump"]), "-o", rel_path(tmp), "--criterion", self.s.criterion
        )
        argv += ["--scheduler", self.s.scheduler, "--quiet"]
        if self.s.workers:
            argv += ["--workers", str(self.s.workers)]
        result = self._run(r, "rank", argv)
        self._completed(r, "rank", argv, [(tmp, p["ranks"])])
        return result

    def stage_prune(self, r: int) -> StageResult:
        p, prev = self.paths(r), self.paths(r - 1)
        tmp = self._partial(p["init"])
        s = self.s
        # measure() saved the previous round's model as a tdump checkpoint (its keep-lists
        # included), so every round prunes a self-describing file
        argv = tdump_argv(
            "prune", rel_path(prev["checkpoint"]), rel_path(p["ranks"]), "-o", rel_path(tmp)
        )
        if s.arch:  # given on the loop's command line: trusted, as with tdump prune --arch
            argv += ["--arch", s.arch]
            if s.arch_kwargs:
                argv += ["--arch-kwargs", json.dumps(s.arch_kwargs)]
        argv += ["--count", str(s.count)] if s.count is not None else ["--ratio", str(s.ratio)]
        argv += ["--scope", s.scope, "--min-channels", str(s.min_channels)]
        if s.max_ratio is not None:
            argv += ["--max-ratio", str(s.max_ratio)]
        if s.conv_only_groups:
            argv += ["--conv-only-groups"]
        shape = self.rows[-1].get("input_shape") if self.rows else None
        if shape:
            argv += ["--input-shape", ",".join(str(v) for v in shape)]
        argv += ["--json"]
        result = self._run(r, "prune", argv)
        self._completed(r, "prune", argv, [(tmp, p["init"])])
        return result

    def stage_train(self, r: int) -> StageResult:
        p, s = self.paths(r), self.s
        dump_tmp, model_tmp = self._partial(p["dump"]), self._partial(p["model"])
        values = {"init": self.init_of(r), "out": str(model_tmp), "round": str(r)}
        args = substitute(s.train_args, values)
        argv = tdump_argv(
            "record", "--out", rel_path(dump_tmp), "--interval", str(s.save_interval())
        )
        include, config = record_options(s)
        if include:
            argv += ["--include", include]
        argv += ["--config", json.dumps(config, separators=(",", ":")), *s.target()]
        if args:
            argv += ["--", *args]
        moves = [(dump_tmp, p["dump"]), (model_tmp, p["model"])]
        result = self._run(r, "train", argv)
        if not model_tmp.exists():
            raise self._fail(
                r,
                "train",
                f"{s.script} exited 0 but saved no checkpoint at {rel_path(model_tmp)} in round {r}; "
                "save with torch.save(model.state_dict(), os.environ['TDUMP_OUT']) or pass {out} in TRAIN_ARGS",
            )
        if not dump_tmp.exists():
            raise self._fail(
                r,
                "train",
                f"nothing was recorded in round {r}: {s.script} trained no model that capture saw "
                f"(log: {rel_path(p['dir'] / 'train.log')})",
            )
        self._completed(r, "train", argv, moves)
        return result

    def _relay(self, r: int, stage: str) -> None:
        # the logs keep everything, but a note there is one nobody reads (rank's "scores
        # rest on one saved step, the untrained model"): say each on the console once
        log = self.paths(r)["dir"] / f"{stage}.log"
        # this round prunes the last round's model: what its surgery leaves alone
        last = self.rows[r - 1] if 0 < r <= len(self.rows) else {}
        left, shared = last.get("left_alone"), last.get("pruned_with")
        for said in stage_notes(log, own_only=stage == "train"):
            line = for_the_loop(said, left, shared) if stage == "rank" else said
            if (stage, line) not in self.relayed:
                self.relayed.add((stage, line))
                self.events.stage_note(r, stage, line)

    # ------------------------------------------------------------------ measure
    def measure(self, r: int, wall: dict[str, float]) -> dict[str, Any]:
        import tdump.surgery as surgery
        from tdump.loop._metrics import (
            dump_metrics,
            left_alone,
            model_stats,
            no_accuracy_note,
            prunable_counts,
            pruned_with,
            rankable_layers,
        )
        from tdump.surgery._input_shape import recorded_input_shape, recorded_more_inputs

        p, s = self.paths(r), self.s
        self.events.stage_started(r, "measure", None)
        t0 = time.perf_counter()
        init = self.init_of(r)
        with script_importable(s.folder()):
            try:  # what `python -m tdump.loop checkpoint` does, logged below
                model = save_round_checkpoint(
                    p["model"], p["checkpoint"], init, s.arch, s.arch_kwargs, p["dump"]
                )
            except TdumpError as exc:
                message = f"round {r}'s checkpoint: {exc}"
                if r == 0 and "plain state_dict" in str(exc):
                    message = arch_needed(
                        rel_path(p["model"]), rel_path(self.exp.path), s.script, p["dump"]
                    )
                elif r > 0 and isinstance(exc, CheckpointError):
                    # the script saved something other than the pruned model it was
                    # started from: useless to the loop, so a resume trains the round again
                    done = dict(self.state.get("done") or {})
                    done.pop("train", None)
                    self._save_state(done=done)
                    self.exp.unlog_command(r, (_TRAIN_ENV, "train"))
                    message += (
                        f"; after fixing that, {resume_hint(self.exp.path, s)} trains round "
                        f"{r} again (with new TRAIN_ARGS after --, if they were the cause)"
                    )
                raise self._fail(r, "measure", message) from None
            if r == 0 and s.arch is None:  # what was inferred for the plain state_dict
                for note in surgery.provenance(model).notes:
                    self.events.note(note)
            shape = s.input_shape or recorded_input_shape(p["dump"])
            try:
                stats = model_stats(model, shape, recorded_more_inputs(p["dump"]))
            except Exception as exc:
                self.events.note(f"FLOPs not counted (forward at input {shape} failed: {exc})")
                stats = model_stats(model, None)
            metrics = dump_metrics(p["dump"])
            if r == 0 and (said := no_accuracy_note(metrics)):
                self.events.note(said)
            prunable = one_group = None
            # the next round ranks this round's dump and prunes this model: count what its
            # prune stage can remove, in all and from one group (what a per-layer --count
            # asks of each), given the layers that ranking will score (None: the ranking
            # or the prune would fail, and that stage says why)
            ranked = rankable_layers(p["dump"], s.criterion) if r + 1 < s.rounds else None
            graph = frozen = shared = None
            if r + 1 < s.rounds:  # one trace serves both: the next round prunes this model
                with contextlib.suppress(TdumpError):  # untraceable: the next prune says why
                    graph = surgery.build_graph(model)
                # what it never prunes, and what it prunes with scored layers without
                # scores of its own, for the next round's rank notes (see _relay)
                only = s.conv_only_groups
                frozen = left_alone(graph, only) if graph is not None else {}
                shared = pruned_with(graph, ranked, only) if graph is not None and ranked else {}
            if ranked is not None and graph is not None:
                try:
                    prunable, one_group = prunable_counts(
                        model,
                        ranked,
                        scope=s.scope,
                        min_channels=s.min_channels,
                        max_ratio=s.max_ratio,
                        conv_only_groups=s.conv_only_groups,
                        graph=graph,
                    )
                except TdumpError:  # ranked layers the model lacks: tdump prune refuses them
                    prunable = one_group = None
        self._log(r, "measure", [checkpoint_command(p, init, s.arch, s.arch_kwargs)])
        wall["measure"] = round(time.perf_counter() - t0, 3)
        self.events.stage_finished(r, "measure", wall["measure"])
        removed = prune_removed(p["dir"] / "prune.log") if r > 0 else None
        base = self.rows[0] if self.rows else None
        return round_row(
            r,
            s,
            stats,
            metrics,
            base,
            shape,
            removed=removed,
            wall=wall,
            prunable=prunable,
            prunable_per_group=one_group,
            left_alone=frozen,
            pruned_with=shared,
        )

    def stop_reason(self, row: dict[str, Any]) -> str | None:
        return stop_reason(
            self.s, row, str(self.paths(row["round"])["dump"]), self._fail, self.exp.path
        )

    # ------------------------------------------------------------------ driver
    def run(self) -> list[dict[str, Any]]:
        if self.rows and self.rows[-1].get("stop_reason"):
            last, arch = self.rows[-1], f" --arch {self.s.arch}" if self.s.arch else ""
            script = " ".join(self.s.target())
            self.events.note(
                f"{self.exp.path} is finished ({last['stop_reason']}); to prune further, start "
                f"a new experiment from its last round: tdump loop {script} --init "
                f"{self.exp.path}/{last['checkpoint']}{arch} ..."
            )
            return self.rows
        self._save_state(status="running", error=None, interrupted=None)
        try:
            return self._rounds()
        except KeyboardInterrupt:
            # the stage's process is already killed (run_stage); say so for show/--resume
            stage = (self.state.get("running") or {}).get("stage")
            self._save_state(status="interrupted", running=None, interrupted=stage)
            raise

    def _rounds(self) -> list[dict[str, Any]]:
        if self.rows and self.state.get("deciding") == self.rows[-1]["round"]:
            # measured, but its stop decision failed (or was killed): decide it now
            self._save_state(running={"stage": "measure", "pid": os.getpid()})
            if self._decide(self.rows[-1]):
                return self.rows
        r = len(self.rows)
        while True:
            if self.state.get("round") != r:
                self._save_state(round=r, done={}, running=None)
            done: dict[str, float] = dict(self.state.get("done") or {})
            remove_write_leftovers(self.exp.round_dir(r))  # of a run killed mid-write
            stages = ["train"] if r == 0 else ["rank", "prune", "train"]
            for stage in stages:
                if stage in done:
                    continue
                for path in self._outputs(r, stage):  # what an interrupted run of it left
                    remove_path(self._partial(path))
                    remove_path(path)
                self._save_state(running={"stage": stage, "pid": os.getpid()})
                result = getattr(self, f"stage_{stage}")(r)
                done[stage] = round(result.seconds, 3)
                self._save_state(done=done, running=None)
                self.events.stage_finished(r, stage, result.seconds)
                self._relay(r, stage)
            self._save_state(running={"stage": "measure", "pid": os.getpid()})
            row = self.measure(r, dict(done))
            # the row is kept before the stop decision, which can fail (a --stop-when
            # over a metric the script does not report) and be made again on --resume;
            # "deciding" first: a kill before the row is written measures again
            self._save_state(deciding=r)
            self.rows.append(row)
            self.exp.write_rows(self.rows)
            if self._decide(row):
                return self.rows
            r += 1

    def _decide(self, row: dict[str, Any]) -> bool:
        """Whether the loop stops after ``row`` (the last of ``self.rows``); recorded."""
        reason = self.stop_reason(row)
        row["stop_reason"] = reason
        self.exp.write_rows(self.rows)
        self._save_state(running=None, deciding=None)
        self.events.round_finished(row, self.rows)
        if self.s.mlflow:
            self._log_mlflow(row)
        if reason:
            status = "finished" if reason.startswith("rounds:") else "stopped"
            self._save_state(status=status, stop_reason=reason, running=None)
        return reason is not None

    def _log_mlflow(self, row: dict[str, Any]) -> None:
        logged = list(self.state.get("mlflow_logged") or [])
        if row["round"] in logged:
            return
        from tdump.loop._mlflow import log_round

        try:
            log_round(self.exp, row, self.s)
        except Exception as exc:  # tracking never stops the loop
            self.events.note(
                f"MLflow logging of round {row['round']} failed: {type(exc).__name__}: {exc}"
            )
            return
        self._save_state(mlflow_logged=[*logged, row["round"]])


def run_loop(
    settings: LoopSettings,
    experiment: str | os.PathLike[str],
    *,
    resume: bool = False,
    events: LoopEvents | None = None,
    replace: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Run (or with ``resume=True`` continue) the pruning loop in ``experiment``.

    Returns the rows of rounds.jsonl. A resumed loop uses the settings stored in the
    experiment (``settings`` starts a new one), except its ``arch`` (an import path
    must be given again) and the settings named in ``replace`` (of
    ``RESUME_REPLACEABLE``: ``stop_when``, ``scheduler``, ``workers``, ``train_args``), whose values in
    ``settings`` replace the stored ones (``stop_when=""``: none).

    Raises
    ------
    ConfigError
        Bad settings (a missing script, a bad ``stop_when``, ...), before any stage runs.
    LoopError
        The experiment is in use, is not one, or a stage failed (``exit_code`` is the
        stage's exit status; the message names the stage and its log).
    """
    events = events or LoopEvents()
    path = Path(experiment)
    check_start(path, settings, resume)
    with Experiment.lock(path):
        if Experiment.is_experiment(path):
            if not resume:
                raise LoopError(f"{path} already holds an experiment; continue it with --resume")
            exp = Experiment.open(path)
            settings = prepare_resume(exp, settings, events, replace)
        else:
            settings.check()
            exp = Experiment.create(path, settings.to_dict())
        return _Loop(exp, settings, events).run()
