"""The registry policy every flow follows: which model of a budget is registered, and where
the aliases point.

Final rows are grouped by budget (a depth, a density). A group's registered model is its
seed with the best selection-split score (ties: the lower seed); ``best`` points at the
group with the best selection-split mean. The dev set is never used to choose: its scores
are the honest estimate and go into the tags. A diverged model (non-finite loss or metric)
is never registered, and a group whose every seed diverged gets no version.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from tasks.tracking import drop_aliases, update_aliases


@dataclass(frozen=True)
class Registration:
    """One budget's registered model: the chosen row and the group it was chosen from."""

    group: Hashable
    alias: str
    chosen: dict
    rows: list[dict]

    @property
    def selection_mean(self) -> float:
        return statistics.mean(r["selection_value"] for r in self.rows)

    @property
    def dev_mean(self) -> float:
        return statistics.mean(r["value"] for r in self.rows)

    def score_tags(self) -> dict[str, str]:
        """The scores every registered version carries."""
        return {"glp.seed": str(self.chosen["seed"]),
                "glp.metric_value": f"{self.chosen['value']:.6f}",
                "glp.metric_mean": f"{self.dev_mean:.6f}",
                "glp.selection_value": f"{self.chosen['selection_value']:.6f}",
                "glp.selection_mean": f"{self.selection_mean:.6f}",
                "glp.seeds_registered_from": str(len(self.rows)),
                **({"glp.int8_value": f"{self.chosen['int8_value']:.6f}"}
                   if self.chosen.get("int8_value") is not None else {}),
                "glp.device": str(self.chosen["device"])}


def chosen(rows: Iterable[dict]) -> dict:
    """The registry rule's member of a group: the best selection-split score (ties: the
    lower seed). The rows are those that did not diverge."""
    return max(rows, key=lambda r: (r["selection_value"], -r["seed"]))


def registrations(rows: Iterable[dict], group: Callable[[dict], Hashable | None],
                  alias: Callable[[Hashable], str]) -> list[Registration]:
    """One registration per group (``group(row)`` is None for rows never registered, such
    as the reference), largest group key first."""
    groups: dict[Hashable, list[dict]] = {}
    for row in rows:
        key = group(row)
        if key is not None and not row["diverged"]:
            groups.setdefault(key, []).append(row)
    return [Registration(key, alias(key), chosen(members), members)
            for key, members in sorted(groups.items(), key=lambda item: item[0], reverse=True)]


INT8 = "-int8"
"""The suffix of an int8 version's aliases: ``density-30-int8``, ``depth-4-int8``,
``best-int8`` (the int8 graph of the model ``best`` points at)."""


def register_all(tracking_uri: str, name: str, plan: list[Registration],
                 register: Callable[[Registration, bool], str], rows: list[dict],
                 group: Callable[[dict], Hashable | None]) -> dict[str, str]:
    """Register every planned version (``register(registration, int8)`` returns its
    number) as fp32, and as int8 where the chosen row was scored in int8; mark every row of
    its group with them (``model_version``, ``int8_model_version``; diverged seeds
    included), and point the aliases: one per group and ``best``, and the same with
    :data:`INT8` after them for the int8 versions. The int8 version is the chosen model's
    own graph, quantised: the selection split chose the model, and int8 is how it is
    deployed. Returns where every alias points afterwards."""
    aliases, int8s, means = {}, {}, {}
    for registration in plan:
        version = register(registration, False)
        scored = registration.chosen.get("int8_value")
        int8 = (register(registration, True)
                if scored is not None and math.isfinite(scored) else None)
        for row in rows:
            if group(row) == registration.group:
                row["registered_model"], row["model_version"] = name, version
                row["int8_model_version"] = int8
        aliases[registration.alias] = version
        if int8 is not None:
            int8s[registration.alias] = int8
        means[registration.alias] = registration.selection_mean
    if not aliases:
        return {}
    best = max(means, key=means.get)
    aliases["best"] = aliases[best]
    if best in int8s:
        int8s["best"] = int8s[best]
    placed = update_aliases(tracking_uri, name, aliases)
    # an int8 alias moves with its fp32 alias: where an older, better version kept the
    # fp32 alias, its int8 alias stays too
    moved = {alias + INT8: version for alias, version in int8s.items()
             if placed.get(alias) == aliases[alias]}
    # an fp32 alias that moved to a model with no int8 graph takes its int8 alias along
    stale = [alias + INT8 for alias in aliases
             if alias not in int8s and placed.get(alias) == aliases[alias]]
    if stale:
        drop_aliases(tracking_uri, name, stale)
    return {**placed, **(update_aliases(tracking_uri, name, moved) if moved else {})}
