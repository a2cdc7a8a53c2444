"""The registry policy every flow follows: which model of a budget is registered, and where
the aliases point.

Final rows are grouped by budget (a depth, a density). A group's registered model is its
seed with the best selection-split score (ties: the lower seed); ``best`` points at the
group with the best selection-split mean. The dev set is never used to choose: its scores
are the honest estimate and go into the tags. A diverged model (non-finite loss or metric)
is never registered, and a group whose every seed diverged gets no version.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from tasks.tracking import update_aliases


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


def register_all(tracking_uri: str, name: str, plan: list[Registration],
                 register: Callable[[Registration], str], rows: list[dict],
                 group: Callable[[dict], Hashable | None]) -> dict[str, str]:
    """Register every planned version (``register`` returns its number), mark every row of
    its group with it (diverged seeds included), and point the aliases: one per group, and
    ``best``. Returns where every alias points afterwards."""
    aliases, means = {}, {}
    for registration in plan:
        version = register(registration)
        for row in rows:
            if group(row) == registration.group:
                row["registered_model"], row["model_version"] = name, version
        aliases[registration.alias] = version
        means[version] = registration.selection_mean
    if not aliases:
        return {}
    aliases["best"] = max(means, key=means.get)
    return update_aliases(tracking_uri, name, aliases)
