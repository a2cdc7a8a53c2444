"""The compressors of ``glp compare --methods``: their sizes, their checks, their rows.

Each compressor (alone or as a step of a composition, :mod:`flows.methods`) runs through
the same path as ``glp compress`` (:mod:`flows.compress`), at this comparison's sizes
(``--density`` for a width method, ``--ratio`` for an offline one) and ``--pruning-epochs``.
"""

from __future__ import annotations

from flows.methods import compressor_names, parse_methods, run_chain
from glp import GlpError
from glp.methods import BUDGET_FIELDS, EQUAL_TRAINING, REFERENCE, compressors, get_method


def compressor_steps(params) -> tuple[str, ...]:
    """Every compressor that ``--methods`` runs, alone or as a step of a composition."""
    steps = [s for name in compressor_names(parse_methods(params.methods))
             for s in name.split("+") if s != "greedy"]
    return tuple(dict.fromkeys(steps))


def method_configs(params, method: str) -> list:
    """One method's parameters at each of this comparison's sizes."""
    from flows.compress import method_params

    spec = get_method(method)
    sizes = getattr(params, BUDGET_FIELDS[spec.budget])
    epochs = pruning_epochs(params).get(method)
    return method_params(spec, sizes, {"pruning_epochs": epochs} if epochs else {})


def used_budgets(params) -> list[str]:
    """The budgets of the compressors --methods runs (``density``, ``ratio``, ...)."""
    used = {get_method(m).budget for m in compressor_steps(params)}
    return [b for b in BUDGET_FIELDS if b in used]


def describe_sizes(params) -> str:
    """The sizes a comparison compresses to: ``density 0.5, 0.3, ratio 2, 4``."""
    return ", ".join(f"{budget} {', '.join(f'{v:g}' for v in getattr(params, field))}"
                     for budget, field in BUDGET_FIELDS.items()
                     if budget in used_budgets(params))


def sizes_identity(params) -> tuple:
    """The sizes in a comparison's job id: densities and ratios, and the other budgets'
    sizes when a chosen method uses them."""
    return (params.densities, params.ratios,
            *(getattr(params, field) for budget, field in BUDGET_FIELDS.items()
              if budget not in ("density", "ratio") and budget in used_budgets(params)))


def trained_while_pruning(params) -> list[str]:
    """The chosen methods that take ``--pruning-epochs``."""
    steps = {s for name in parse_methods(params.methods) for s in name.split("+")}
    return [m.name for m in compressors() if m.name in steps and "pruning_epochs" in m.options()]


def pruning_epochs(params) -> dict[str, float]:
    """``--pruning-epochs`` per method of ``--methods`` that takes it: ``3`` sets every one
    and ``grain=3`` one (over a bare number, whatever the order); a GlpError names a value
    that is malformed, given twice, or would be ignored."""
    used = trained_while_pruning(params)
    takers = [m.name for m in compressors() if "pruning_epochs" in m.options()]
    given: dict[str, tuple[str, float]] = {}  # method, or "" for a bare number: (typed, epochs)
    for value in params.pruning_epochs:
        method, _, number = value.rpartition("=")
        method = method.strip().lower()
        try:
            epochs = float(number)
        except ValueError:
            epochs = float("nan")
        if not epochs > 0 or epochs == float("inf"):
            raise GlpError(f"--pruning-epochs {value!r}: expected EPOCHS > 0 or "
                           "METHOD=EPOCHS, e.g. 3 or grain=3")
        if method and method not in takers:
            raise GlpError(f"--pruning-epochs {value!r}: {method!r} takes no pruning epochs; "
                           f"choose {' or '.join(takers)}")
        if (method and method not in used) or not used:
            raise GlpError(f"--pruning-epochs {value!r} trains a width method; --methods "
                           f"{','.join(parse_methods(params.methods))} has "
                           f"{'no ' + method if method else 'none'} "
                           f"(add {method or ' or '.join(takers)})")
        if method in given:
            raise GlpError(f"--pruning-epochs {given[method][0]!r} and {value!r}: "
                           f"{'one value per method' if method else 'one bare number'}, "
                           "please")
        given[method] = (value, epochs)
    return {m: given.get(m, given.get(""))[1] for m in used if m in given or "" in given}


def pruning_identity(params) -> tuple:
    """What ``--pruning-epochs`` changes, for the job id: the values that differ from the
    methods' defaults (typing a default is the same job)."""
    default = {m: get_method(m).options()["pruning_epochs"].default
               for m in trained_while_pruning(params)}
    changed = sorted((m, e) for m, e in pruning_epochs(params).items() if e != default[m])
    return (changed,) if changed else ()


def check_compressors(params, model_path: str) -> None:
    """Every compressor's sizes, checked on the base model before anything runs."""
    from flows.compress import check_on_model

    for method in compressor_steps(params):
        check_on_model(get_method(method), method_configs(params, method), model_path)


def compressed_method_rows(params, job, methods: tuple[str, ...],
                     layer_rows: list[dict], register: bool = False) -> list[dict]:
    """Every compressor and composition, from the shared source model (flows/methods.py);
    with ``register``, each under its own registered name (:func:`method_registry_name`),
    one ONNX version per size, as ``glp compress`` registers them."""
    from flows.compress import compressed_rows, job_source, register_sizes, training_of

    if not methods:
        return []
    source = job_source(job)[0]()
    depth = job.num_layers - params.remove

    def greedy_rows() -> list[dict]:
        return [r for r in layer_rows if r["strategy"] == "greedy" and not r["variant"]
                and r["depth"] == depth]

    made: list[dict] = []  # every step's rows: a later step's source is among them

    def step(method: str, start) -> list[dict]:
        found = compressed_rows(job, get_method(method), method_configs(params, method), start,
                                trained=training_of([*layer_rows, *made], start))
        made.extend(found)
        return found

    rows: list[dict] = []
    for name in methods:
        chain = run_chain(name, source, greedy_rows, step)
        if register:
            register_sizes(job, method_registry_name(job.slug, job.data.task, name,
                                                     params.remove, first_sizes(params)),
                           chain, get_method(name.split("+")[-1]))
        rows += chain
    return rows


def first_sizes(params) -> dict[str, float]:
    """Each budget's first size: what a step in the middle of a composition passes on."""
    return {budget: getattr(params, field)[0] for budget, field in BUDGET_FIELDS.items()}


def equal_training_rows(job, rows: list[dict]) -> list[dict]:
    """The unpruned model fine-tuned for as long as the longest-trained model of ``rows``
    (its teacher's training included), when that is longer than the reference's own:
    rows of :data:`glp.methods.EQUAL_TRAINING`, so that no method's lead is its extra
    epochs. None when every model trained as long as the reference or less."""
    reference = max((r["train_epochs"] for r in rows if r["strategy"] == REFERENCE
                     and r.get("train_epochs") is not None), default=None)
    longest = max((r["train_epochs"] for r in rows if r["strategy"] != REFERENCE
                   and r.get("train_epochs") is not None), default=None)
    if reference is None or longest is None or longest <= reference + 1e-6:
        return []
    return job.finals([(EQUAL_TRAINING, "", job.num_layers, ())], epochs=round(longest, 4))


def method_registry_name(slug: str, task: str, method: str, remove: int,
                         sizes: dict[str, float]) -> str:
    """``glp-<model>-<task>-<method>``, the name ``glp compress --method`` registers a single
    method under. A composition names its steps and the size each passed on, since the
    versions' aliases name only the last step's size: greedy by the layers it removed (as
    ``glp compress --prune-layers`` does), a width step by the share it kept (the first
    ``--density`` or ``--constraint``), so ``greedy+mlpruning+lowrank`` at --remove 2 and
    --density 0.5 is ``…-greedy2-mlpruning50-lowrank``."""
    steps = method.split("+")
    named = [f"greedy{remove}" if step == "greedy" else
             f"{step}{round(sizes[get_method(step).budget] * 100):02d}"
             if index < len(steps) - 1 else step
             for index, step in enumerate(steps)]
    return f"glp-{slug}-{task}-{'-'.join(named)}"


def check_sizes_used(params) -> None:
    """Refuse what --methods would silently ignore: a size no chosen method uses."""
    methods = parse_methods(params.methods)
    budgets = used_budgets(params)
    given = params.model_fields_set
    for budget, field in BUDGET_FIELDS.items():
        if field in given and budget not in budgets:
            users = [m.name for m in compressors() if m.budget == budget]
            raise GlpError(f"--{budget} sizes {' and '.join(users)}; --methods "
                           f"{','.join(methods)} has none of them")
    pruning_epochs(params)
