"""The search's decision task: which layer to remove next."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from glp.methods.layers import search


@task(name="select-layer", cache_policy=NO_CACHE)
def select_layer(candidates: list[tuple[int, float]]) -> int:
    """The layer to remove next (best score; ties go to the highest index)."""
    return search.select_layer(candidates)
