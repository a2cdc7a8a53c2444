"""Every compression method in one comparison: ``glp compare --methods``.

A method is any registered one (:mod:`glp.methods`): a layer strategy (``greedy``,
``top``, ...), a width or an offline method, or a composition of these written with ``+``
and applied left to right as one plan: ``greedy+lowrank`` compresses greedy's best model of
``L - remove`` layers by truncated SVD, ``greedy+mlpruning+lowrank`` prunes that model in
width first. What may follow what is each method's declaration (``followed_by``,
``first_only``). A compressor starts from the comparison's source model (the unpruned model
fine-tuned with the first final seed, the reference row's own fine-tune, or the input as it
is when it is fine-tuned), so one teacher serves every method; a composition's later step
starts from the best seed (by the selection split) of the step before at its first size,
which is also its teacher.

Every task is the one ``glp prune`` and ``glp compress`` run, cached the same way: a
teacher, a candidate or a compressed model that two methods share is computed once.
"""

from __future__ import annotations

from collections.abc import Callable

from glp import GlpError
from glp.methods import compressors, get_method, is_method, names
from tasks.registry import chosen
from tasks.training import Checkpoint

EXAMPLES = ("greedy+lowrank", "greedy+mlpruning", "greedy+mlpruning+lowrank")


def parse_methods(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"greedy,top,mlpruning,greedy+lowrank"`` (or a list): known, unique names in the
    given order, or a GlpError naming the bad one and what would be valid."""
    items = value.split(",") if isinstance(value, str) else list(value)
    valid = f"{', '.join(names())}, or compositions such as {', '.join(EXAMPLES)}"
    if not any(n.strip() for n in items):
        raise GlpError(f"--methods: no method given; choose from {valid}")
    if not all(n.strip() for n in items):
        typed = value if isinstance(value, str) else ",".join(items)
        raise GlpError(f"--methods {typed}: an empty name between commas; give names "
                       f"separated by single commas, e.g. greedy,top,mlpruning")
    items = [n.strip().lower() for n in items]
    items = ["+".join(step.strip() for step in name.split("+")) for name in items]
    for name in items:
        steps = name.split("+")
        for step in steps:
            if not is_method(step):
                raise GlpError(f"--methods {name}: unknown method {step!r}; choose from "
                               f"{valid}")
        if len(steps) > 1:
            check_composition(name, steps)
    return tuple(dict.fromkeys(items))


def check_composition(name: str, steps: list[str]) -> None:
    """Refuse a composition whose methods cannot follow each other, as they declare."""
    first = get_method(steps[0])
    if first.family == "layers" and first.name != "greedy":
        raise GlpError(f"--methods {name}: a composition starts with greedy (the layer "
                       "strategy whose models are fine-tuned at every depth) or a compressor, "
                       f"then compressors ({', '.join(m.name for m in compressors())}), e.g. "
                       f"{', '.join(EXAMPLES)}")
    for before, after in zip(steps, steps[1:], strict=False):
        earlier, later = get_method(before), get_method(after)
        if later.family == "layers":
            raise GlpError(f"--methods {name}: {after} is a layer strategy; it can only "
                           "come first (greedy)")
        if later.first_only:
            raise GlpError(f"--methods {name}: {after} starts from the unpruned model; it "
                           "can only come first")
        if later.family not in earlier.followed_by:
            allowed = ", ".join(earlier.followed_by) or "nothing"
            article = "an" if later.family[0] in "aeiou" else "a"
            raise GlpError(f"--methods {name}: {article} {later.family} method cannot follow "
                           f"{before} (it may be followed by: {allowed})")


def layer_strategies(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The layer strategies the methods need: those named, and greedy for a composition."""
    needed = [m for m in methods if is_method(m, "layers")]
    if any(m.startswith("greedy+") for m in methods) and "greedy" not in needed:
        needed.insert(0, "greedy")
    return tuple(needed)


def compressor_names(methods: tuple[str, ...]) -> tuple[str, ...]:
    """The compressors and compositions among ``methods`` (everything but layer strategies)."""
    return tuple(m for m in methods if not is_method(m, "layers"))


def best_checkpoint(rows: list[dict], what: str) -> Checkpoint:
    """The registry rule's member of a group of rows: the best selection score among the
    seeds that did not diverge (ties: the lower seed)."""
    alive = [r for r in rows if not r["diverged"] and r.get("_checkpoint") is not None]
    if not alive:
        raise GlpError(f"{what}: every seed diverged, so nothing can be compressed further; "
                       "lower --lr or turn on clipping (--max-grad-norm)")
    return chosen(alive)["_checkpoint"]


def run_chain(name: str, source: Checkpoint, greedy_rows: Callable[[], list[dict]],
              step: Callable[[str, Checkpoint], list[dict]]) -> list[dict]:
    """One compressor or composition: each step compresses the best model of the one
    before (greedy: its deepest pruned depth's best seed), and the last step's rows are the
    method's, named after the whole composition."""
    steps = name.split("+")
    if steps[0] == "greedy":
        source, steps = best_checkpoint(greedy_rows(), f"--methods {name}: greedy"), steps[1:]
    rows: list[dict] = []
    prior = 0.0  # the compute of the earlier steps' size it uses (greedy's: the flow's)
    for index, method in enumerate(steps):
        rows = step(method, source)
        if index < len(steps) - 1:
            column = f"target_{get_method(method).budget}"
            first = rows[0][column]
            used = [r for r in rows if r[column] == first]
            prior += sum(r.get("fine_tune_seconds") or 0.0 for r in used)
            source = best_checkpoint(used, f"--methods {name}: {method}")
    if "+" in name:
        for row in rows:
            row["strategy"], row["method"], row["_prior_seconds"] = name, name, prior
    return rows
