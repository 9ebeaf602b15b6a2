"""`tdump loop` relays its stages' `note:` and `warning:` lines to its own console."""

from __future__ import annotations

from pathlib import Path

from tdump._format import StoreReader
from tdump.loop._stages import for_the_loop
from tests.loop.conftest import BASE, TRAIN, rows_of, run_tdump


def test_rank_and_record_notes_reach_the_loops_stderr(tmp_path: Path) -> None:
    """With the default --interval (10 for the Taylor term at the source), an 8-step
    script saves step 0 only: the loop prunes from the untrained model, and says so on
    its console, not just in the logs."""
    exp = tmp_path / "exp"
    options = [a for a in BASE if a not in ("--interval", "2")]
    proc = run_tdump("loop", TRAIN, "--rounds", "2", *options, "--experiment", str(exp))
    assert proc.returncode == 0, proc.stderr
    rank = "round 1 rank: note: taylor scores rest on one saved step (step 0, the untrained model)"
    record = "round 0 train: warning: only one saved train step with the model's tensors (step 0)"
    err = proc.stderr.splitlines()
    assert sum(line.startswith(rank) for line in err) == 1, err
    # round 1's dump has the same one step: the identical warning is not repeated
    assert sum(line.startswith(record) for line in err) == 1, err
    assert "round 1 train: warning" not in proc.stderr
    # the logs keep what the stages printed, as before
    assert "note: taylor scores rest on one saved step" in (exp / "round_001/rank.log").read_text()
    assert "tdump: warning: only one saved" in (exp / "round_001/train.log").read_text()


def test_the_default_interval_saves_every_10th_step_of_the_taylor_term(tmp_path: Path) -> None:
    """The loop records the Taylor term at the source (a few KB per saved step), so by
    default it saves every 10th step: a 25-step script ranks from steps 0, 10 and 20,
    not from its untrained step 0 alone (full tensors keep --interval 100)."""
    exp = tmp_path / "exp"
    options = [a for a in BASE if a not in ("--interval", "2")]
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "1", *options, "--experiment", str(exp), "--", "--steps", "25"
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: only one saved" not in proc.stderr
    assert " --interval 10 " in (exp / "commands.sh").read_text()
    reader = StoreReader(str(exp / "round_000" / "dump.zarr"))
    names = reader.tensor_names("train")
    taylor = [n for n in names if n.endswith(".taylor")]
    assert taylor and not any(n.endswith(".weight") for n in names)
    saved = reader.steps("train")[reader.saved_records("train", taylor[0])]
    assert saved.tolist() == [0, 10, 20]  # losses: every step; the Taylor term: every 10th


def test_a_rank_hint_to_record_more_is_said_as_the_loops_option(tmp_path: Path) -> None:
    """Rank's "record X: tdump record --include ..." becomes the loop's own --include."""
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "2", *BASE, "--include", ".*relu1", "--experiment", str(exp)
    )
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("round 1 rank: note: no ")]
    assert len(notes) == 1 and "scores for 1 conv layer (conv2)" in notes[0], proc.stderr
    assert (
        "record those outputs with gradients: tdump loop SCRIPT --include '.*relu1|" in (notes[0])
    )
    assert notes[0].endswith(" (a new experiment)") and "tdump record" not in notes[0]
    # the stage's own log keeps rank's words
    assert ": tdump record --include '.*relu1|" in (exp / "round_001/rank.log").read_text()


def _unscored_note(exp: Path, net: str, flag: str, layer: str, *options: str) -> str:
    """Two rounds of the loop on tinynet's ``net`` (the script's ``flag`` trains it) into
    ``exp``: round 1's one rank note on a layer without scores, which must be ``layer``."""
    base = [a if a != "tinynet.TinyNet" else f"tinynet.{net}" for a in BASE]
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "2", *base, *options, "--experiment", str(exp), "--", flag
    )
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("round 1 rank: note: no ")]
    assert len(notes) == 1 and f"scores for 1 conv layer ({layer})" in notes[0], proc.stderr
    return notes[0]


def test_no_advice_to_record_a_layer_the_surgery_never_prunes(tmp_path: Path) -> None:
    """TokenNet's patch embedding, like a ViT's conv_proj, feeds a torch.cat with a class
    token: recorded with an explicit --include (no pre-activations added), rank cannot
    score it and would advise recording it, but pruning leaves it alone whatever its
    scores, so the loop says that instead of suggesting a new run."""
    exp = tmp_path / "exp"
    note = _unscored_note(exp, "TokenNet", "--tokens", "embed", "--include", ".*relu1")
    assert note.endswith(
        "tdump prune leaves it alone (consumed by unsupported operation 'transpose'), "
        "so recording more would not prune it"
    ), note
    assert "--include" not in note and "new experiment" not in note
    # rank's own advice stays in its log; the rows say what the surgery leaves alone
    assert "(?:^|\\.)embed\\.output_0" in (exp / "round_001/rank.log").read_text()
    rows = rows_of(exp)
    assert set(rows[0]["left_alone"]) == {"embed", "fc"} and rows[1]["left_alone"] is None
    # and it did prune what it could: conv1 lost channels, embed kept its 16
    assert rows[1]["channels"]["conv1"] < 16 == rows[1]["channels"]["embed"]


def test_no_advice_to_record_a_layer_pruned_with_scored_ones(tmp_path: Path) -> None:
    """SkipNet's shortcut conv, like a ResNet's downsample, has no Taylor score (its
    BatchNorm output goes into the residual +), so rank advises recording it; but the
    surgery prunes its channels with conv2's, which are scored, so the loop says that
    instead of suggesting a new experiment, and prunes both alike."""
    exp = tmp_path / "exp"
    note = _unscored_note(exp, "SkipNet", "--skip", "proj")
    assert note.endswith(
        "tdump prune prunes it with the scored layer whose channels it shares (conv2), "
        "so it needs no score of its own"
    ), note
    assert "--include" not in note and "new experiment" not in note
    # rank says so itself (capture recorded the + that adds proj's channels to conv2's);
    # the rows say what prunes with what
    assert (
        "prunes it with the scored layer whose channels it shares (conv2)"
        in (exp / "round_001/rank.log").read_text()
    )
    rows = rows_of(exp)
    assert rows[0]["pruned_with"] == {"proj": ["conv2"]} and rows[1]["pruned_with"] is None
    channels = rows[1]["channels"]
    assert channels["proj"] == channels["conv2"] < 16, channels


def test_advice_stays_unless_every_named_layer_is_left_alone() -> None:
    """The rewrite needs every layer of the note frozen; a wrapper's prefix is skipped."""
    note = (
        "note: no taylor scores for 2 conv layers (module.conv_proj, module.c2): no activation "
        "module receives these channels alone; to score them, record X: tdump record --include 'a'"
    )
    kept = for_the_loop(note, {"conv_proj": "torch.cat"})
    assert kept.endswith("tdump loop SCRIPT --include 'a' (a new experiment)")
    both = for_the_loop(note, {"conv_proj": "torch.cat", "c2": "reaches the model output"})
    assert both.endswith(
        "tdump prune leaves them alone (torch.cat; reaches the model output), "
        "so recording more would not prune them"
    )
    many = note.replace("module.conv_proj, module.c2", "a, b, c, d, e, f and 1 more")
    assert for_the_loop(many, dict.fromkeys("abcdefg", "x")).endswith("(a new experiment)")


def test_a_note_on_layers_pruned_alone_and_with_others_says_both() -> None:
    """Layers the surgery leaves alone and layers it prunes with scored ones, in one note:
    each named with its reason; one layer neither keeps the advice."""
    note = (
        "note: no taylor scores for 3 conv layers (module.conv_proj, module.l2.down, module.l3.down): "
        "no activation module receives these channels alone; to score them, record X: "
        "tdump record --include 'a'"
    )
    frozen = {"conv_proj": "torch.cat"}
    shared = {"l2.down": ["l2.0.conv2", "l2.1.conv2"], "l3.down": ["l3.0.conv2", "l3.1.conv2"]}
    said = for_the_loop(note, frozen, shared)
    assert said.endswith(
        "; tdump prune leaves module.conv_proj alone (torch.cat) and prunes module.l2.down, "
        "module.l3.down with the scored layers whose channels they share (l2.0.conv2, "
        "l2.1.conv2, l3.0.conv2 and 1 more), so they need no score of their own"
    ), said
    # without the frozen one, the layers are "them"
    two = note.replace("3 conv layers (module.conv_proj, ", "2 conv layers (")
    assert for_the_loop(two, {}, shared).endswith(
        "tdump prune prunes them with the scored layers whose channels they share "
        "(l2.0.conv2, l2.1.conv2, l3.0.conv2 and 1 more), so they need no score of their own"
    )
    # a named layer that is neither: the advice stays
    del shared["l3.down"]
    assert for_the_loop(note, frozen, shared).endswith("(a new experiment)")


def test_with_conv_only_groups_rank_s_pruned_with_note_says_left_alone() -> None:
    """Rank's note on layers a residual + adds to scored ones says the surgery prunes them
    together; under --conv-only-groups the loop knows it leaves them alone, and says that."""
    note = (
        "note: no taylor scores for 1 conv layer (proj): their outputs are added to other "
        "layers' (a residual +) before any activation module; tdump prune prunes it with the "
        "scored layer whose channels it shares (conv2), so it needs no score of its own"
    )
    alone = {"proj": "a residual group, which --conv-only-groups leaves alone"}
    assert for_the_loop(note, alone) == (
        "note: no taylor scores for 1 conv layer (proj): their outputs are added to other "
        "layers' (a residual +) before any activation module; tdump prune leaves it alone "
        "(a residual group, which --conv-only-groups leaves alone), so recording more would "
        "not prune it"
    )
    assert for_the_loop(note) == note


def test_a_round_0_without_accuracy_says_how_to_get_one(tmp_path: Path) -> None:
    """No tdump.report and a functional eval loss: the table's acc column is empty, and
    the loop says why and what to add, once (not for every round)."""
    exp = tmp_path / "exp"
    proc = run_tdump(
        "loop", TRAIN, "--rounds", "2", *BASE, "--experiment", str(exp),
        "--", "--no-report", "--functional-eval",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    said = "note: round 0 has no accuracy: the script reported none"
    assert proc.stdout.count(said) == 1, proc.stdout
    assert "add tdump.report(accuracy=acc, loss=loss)" in proc.stdout
    assert [r["accuracy"] for r in rows_of(exp)] == [None, None]
    # with a report, no such note
    exp2 = tmp_path / "exp2"
    proc = run_tdump("loop", TRAIN, "--rounds", "1", *BASE, "--experiment", str(exp2))
    assert proc.returncode == 0 and "has no accuracy" not in proc.stdout + proc.stderr
