"""The notes a selection adds to its plan: what went short of the count asked, and why.

A plan's ``notes`` tell the user, in one line each, why fewer channels went than
asked (caps, grouped convs, ``round_to``) and which groups had no ranks to decide
by. They live apart from :func:`tdump.surgery._plan.select` to keep it readable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tdump.surgery._graph import Group
    from tdump.surgery._plan import Plan

__all__ = ["global_shortfall", "pooled", "say_shortfall", "unranked_notes"]

#: The reason a grouped conv's group removes fewer channels than chosen, in either scope.
_GROUPED = "grouped convs lose channels only in multiples of their groups"
#: The reason a group under a GroupNorm removes fewer channels than chosen.
_CHUNKED = "channels under a GroupNorm or pixel_shuffle go only in whole groups"


def say_shortfall(plan: Plan, short: dict[str, int], chosen: int, scope: str) -> None:
    """A note on why fewer channels went than were chosen: grouped convs, GroupNorms, ``round_to``."""
    reasons = []
    if short["blocks"]:
        reasons.append(_GROUPED)
    if short["units"]:
        reasons.append(_CHUNKED)
    if short["round_to"]:
        reasons.append("round_to rounds kept counts up")
    if not reasons:
        return
    if scope == "per-layer":
        plan.notes.append(
            f"{short['groups']} groups lost fewer channels than asked: {'; '.join(reasons)}"
        )
    else:
        plan.notes.append(f"removed {plan.removed} of {chosen}: {'; '.join(reasons)}")


def unranked_notes(
    cands: list[tuple[Group, tuple[np.ndarray, np.ndarray], int]],
    unranked: list[Group],
    scores: dict[str, np.ndarray],
) -> list[str]:
    """Groups kept whole for lack of ranks, and groups scored by some of their members only."""
    out = []
    if unranked:
        names = ", ".join(g.members[0] for g in unranked[:3]) + (
            ", ..." if len(unranked) > 3 else ""
        )
        out.append(
            f"{len(unranked)} prunable group(s) have no ranks and keep all their channels "
            f"({names}): rank their layers (convs, hidden Linears) to prune them"
        )
    partial = [g for g, _, _ in cands if any(m not in scores for m in g.members)]
    if partial:
        g = partial[0]
        missing = [m for m in g.members if m not in scores]
        ranked = [m for m in g.members if m in scores]
        out.append(
            f"{len(partial)} group(s) are scored by some of their members only: e.g. "
            f"{', '.join(missing[:2])} (no ranks) follows {', '.join(ranked[:2])}, "
            "whose channels it shares"
        )
    return out


def pooled(cands: list[tuple[Group, tuple[np.ndarray, np.ndarray], int]]) -> int:
    """Channels the caps alone would let a global selection remove."""
    return sum(cap for _, _, cap in cands)


def global_shortfall(
    cands: list[tuple[Group, tuple[np.ndarray, np.ndarray], int]],
    removed: dict[int, int],
    want: int,
    round_to: int | None,
) -> str:
    """Why a global selection removed fewer than ``want``: the steps its groups lose in."""
    reasons = []
    if any(grp.blocks > 1 for grp, _, _ in cands):
        reasons.append(_GROUPED)
    if any(grp.units is not None for grp, _, _ in cands):
        reasons.append(_CHUNKED)
    if round_to and round_to > 1:
        reasons.append(f"round_to keeps channel counts multiples of {round_to}")
    why = "; ".join(reasons) or "no remaining step fits"
    return f"removed {sum(removed.values())} of {want}: {why} (the closest total not above {want})"
