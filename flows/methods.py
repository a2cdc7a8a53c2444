"""Every compression method in one comparison: ``glp compare --methods``.

A method is a layer strategy (``greedy``, ``top``, ...), a width method (``mlpruning``,
``grain``), an offline one (``lowrank``, ``autoencoder``) or a composition of these, written
with ``+`` and applied left to right as one plan: ``greedy+lowrank`` compresses greedy's
best model of ``L - remove`` layers by truncated SVD, ``greedy+mlpruning+lowrank`` prunes
that model in width first. Width and offline methods start from the unpruned model
fine-tuned with the first final seed (the reference row's own fine-tune, so one teacher
serves every method); a composition's later step starts from the best seed (by the
selection split) of the step before at its first budget, which is also its teacher.

Every task is the one ``glp prune`` and ``glp compress`` run, cached the same way: a
teacher, a candidate or a compressed model that two methods share is computed once.
"""

from __future__ import annotations

from collections.abc import Callable

from glp import GlpError
from glp.methods.names import OFFLINE_METHODS, STRATEGY_NAMES, WIDTH_METHODS
from tasks.registry import chosen
from tasks.training import Checkpoint

COMPRESSORS = (*WIDTH_METHODS, *OFFLINE_METHODS)
"""The methods that compress a given model (not layer strategies)."""
EXAMPLES = ("greedy+lowrank", "greedy+mlpruning", "greedy+mlpruning+lowrank")


def parse_methods(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"greedy,top,mlpruning,greedy+lowrank"`` (or a list): known, unique names in the
    given order, or a GlpError naming the bad one and what would be valid."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n.strip()]
    valid = f"{', '.join((*STRATEGY_NAMES, *COMPRESSORS))}, or compositions such as " \
            f"{', '.join(EXAMPLES)}"
    if not names:
        raise GlpError(f"--methods: no method given; choose from {valid}")
    names = ["+".join(step.strip() for step in name.split("+")) for name in names]
    for name in names:
        steps = name.split("+")
        if len(steps) == 1:
            if name not in STRATEGY_NAMES and name not in COMPRESSORS:
                raise GlpError(f"--methods {name}: unknown method; choose from {valid}")
            continue
        first, rest = steps[0], steps[1:]
        if first != "greedy" and first not in COMPRESSORS or any(
                s not in COMPRESSORS for s in rest):
            raise GlpError(f"--methods {name}: a composition is greedy or a compressor, "
                           f"then compressors ({', '.join(COMPRESSORS)}), e.g. "
                           f"{', '.join(EXAMPLES)}")
        widths = [s for s in steps if s in WIDTH_METHODS]
        offline = [i for i, s in enumerate(steps) if s in OFFLINE_METHODS]
        if len(widths) > 1 or len(offline) > 1:
            raise GlpError(f"--methods {name}: one width method and one offline method at "
                           "most (a model cut in width is not cut again)")
        if offline and offline[0] != len(steps) - 1:
            raise GlpError(f"--methods {name}: the offline method comes last (its factorised "
                           "matrices are not pruned again)")
        if "grain" in steps[1:]:
            raise GlpError(f"--methods {name}: GRAIN starts from the unpruned model; it can "
                           "only come first")
        if "grain" in steps and offline:
            raise GlpError(f"--methods {name}: GRAIN cuts inside the attention heads and "
                           "factorises the embeddings; offline compression does not apply "
                           "after it here")
    return tuple(dict.fromkeys(names))


def layer_strategies(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The layer strategies the methods need: those named, and greedy for a composition."""
    needed = [m for m in methods if m in STRATEGY_NAMES]
    if any(m.startswith("greedy+") for m in methods) and "greedy" not in needed:
        needed.insert(0, "greedy")
    return tuple(needed)


def compressors(methods: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m for m in methods if m not in STRATEGY_NAMES)


def best_checkpoint(rows: list[dict], what: str) -> Checkpoint:
    """The registry rule's member of a group of rows: the best selection score among the
    seeds that did not diverge (ties: the lower seed)."""
    alive = [r for r in rows if not r["diverged"] and r.get("_checkpoint") is not None]
    if not alive:
        raise GlpError(f"{what}: every seed diverged, so nothing can be compressed further; "
                       "lower --lr or turn on clipping (--max-grad-norm)")
    return chosen(alive)["_checkpoint"]


def run_chain(name: str, teacher: Checkpoint, greedy_rows: Callable[[], list[dict]],
              step: Callable[[str, Checkpoint], list[dict]]) -> list[dict]:
    """One compressor or composition: each step compresses the best model of the one
    before (greedy: its deepest pruned depth's best seed), and the last step's rows are the
    method's, named after the whole composition."""
    steps = name.split("+")
    source = teacher
    if steps[0] == "greedy":
        source, steps = best_checkpoint(greedy_rows(), f"--methods {name}: greedy"), steps[1:]
    rows: list[dict] = []
    prior = 0.0  # the compute of the earlier steps' size it uses (greedy's: the flow's)
    for index, method in enumerate(steps):
        rows = step(method, source)
        if index < len(steps) - 1:
            first = rows[0].get("target_density", rows[0].get("target_ratio"))
            used = [r for r in rows if r.get("target_density", r.get("target_ratio")) == first]
            prior += sum(r.get("fine_tune_seconds") or 0.0 for r in used)
            source = best_checkpoint(used, f"--methods {name}: {method}")
    if "+" in name:
        for row in rows:
            row["strategy"], row["method"], row["_prior_seconds"] = name, name, prior
    return rows
