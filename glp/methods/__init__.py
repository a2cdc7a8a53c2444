"""Compression methods: one package per method, and the registry that names them.

A method is a package ``glp/methods/<name>/`` whose ``__init__.py`` declares it (cheaply:
no torch) with :func:`register_method`, and whose algorithm lives in a module beside it.
It declares:

- its name, family (``layers``: chooses encoder layers to remove, run at every depth by
  the search; ``width``: cuts heads, dimensions or neurons and trains; ``offline``:
  compresses weights with no training) and a one-line summary;
- its parameters as one frozen dataclass (:class:`Method.params`): defaults, help text in
  each field's metadata, and validation in ``__post_init__`` raising :class:`ParamError`;
  the CLI options, the flow parameters and prefect.yaml's defaults come from it;
- what it needs (:data:`NEEDS`): a fine-tuned ``teacher``, the ``pretrained`` model the
  teacher was fine-tuned from, the ``train`` split, the ``selection`` split;
- its settings beside its reference implementation's (:class:`Setting`): docs/methods.md
  holds the table :func:`settings_markdown` makes of them, and a test keeps it equal;
- one call, ``run(context, params) -> Outcome``: a model (in ``context``) becomes a
  compressed model with its plan, and records of what each phase did.

Flows and tasks find methods here and never branch on a method's name. Importing this
module costs nothing (no torch): an algorithm module is imported only when it runs, and the
built-in packages are imported by name, so that a Prefect task's code fingerprint (which
follows static imports, :mod:`glp.core.provenance`) covers only the method it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from glp.core.errors import GlpError, ParamError

REFERENCE = "unpruned"
"""The strategy (and method) name of the reference row: the fine-tuned unpruned model."""

EQUAL_TRAINING = "unpruned-equal"
"""The strategy of the unpruned model fine-tuned for as long as the longest-trained method
of a comparison (teacher included): its method is :data:`REFERENCE`."""

LAYER_METHOD = "layers"
"""The method name of every layer strategy's rows (their strategy column names them)."""

FAMILIES = ("layers", "width", "offline")
"""``layers``: removes encoder layers, searched at every depth; ``width``: cuts inside the
layers and trains; ``offline``: compresses the weights with no training."""

NEEDS = ("teacher", "pretrained", "train", "selection")
"""What a method may need: the fine-tuned model it starts from as a distillation teacher,
the pre-trained model that one was fine-tuned from (with a new task head, as a student to
initialise from), the training split (it trains), the selection split (it scores or
estimates on it)."""

BUDGETS = {"density": "fraction of the encoder weights to keep",
           "ratio": "compression ratio of the compressed matrices",
           "constraint": "fraction of the encoder's multiply-accumulates to keep"}
"""What sizes a compressed model, by the name of the parameter field that holds it."""

BUDGET_FIELDS = {"density": "densities", "ratio": "ratios", "constraint": "constraints"}
"""The flows' parameter that lists a budget's sizes (``--density`` repeated: densities)."""

BUILTIN = ("glp.methods.layers", "glp.methods.mlpruning", "glp.methods.grain",
           "glp.methods.post_training", "glp.methods.lowrank", "glp.methods.autoencoder")
"""The packages of glp's own methods, imported by name on first use (display order)."""


def param(default: Any, help: str, *, option: str | None = None) -> Any:
    """A parameter field: its default, its help text, and (where it differs from the field
    name) its option name, e.g. ``option="grain_start"`` for ``start``."""
    metadata = {"help": help, **({"option": option} if option else {})}
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_number(name: str, value: float, ok: bool, valid: str) -> None:
    """Raise a :class:`ParamError` unless ``ok`` and ``value`` is finite."""
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ParamError(name, value, valid)


@dataclass
class Context:
    """What a method's ``run`` gets: the model to compress and what it declared it needs.

    ``teacher()`` loads a second copy of the starting model (the distillation teacher);
    ``pretrained()`` loads the pre-trained model it was fine-tuned from, with a new task
    head of the same shape;
    ``train`` and ``selection`` are tokenized splits, read the first time a method uses
    them (a method that needs none of a split's rows costs nothing for it); ``score(model)``
    is the task metric on the selection split (higher is better); ``progress(label)``
    returns a step callback ``on_step(step, total)`` and the function that closes it.
    """

    model: Any
    config: Any  # glp.training.config.FineTuneConfig
    seed: int
    device: str = "cpu"
    is_regression: bool = False
    teacher: Callable[[], Any] | None = None
    pretrained: Callable[[], Any] | None = None
    load_train: Callable[[], Any] | None = None
    load_selection: Callable[[], Any] | None = None
    score: Callable[[Any], float] | None = None
    progress: Callable[[str], tuple[Callable[[int, int], None], Callable[[], None]]] = (
        lambda label: ((lambda step, total: None), (lambda: None)))

    def student_and_teacher(self, init: str, method: str) -> tuple[Any, Any]:
        """The model a distilling method trains and its teacher: the fine-tuned model
        taught by a copy of itself (``init="teacher"``), or the pre-trained model it came
        from taught by the fine-tuned one (``init="pretrained"``). ``method`` names the
        method in the error for a run with no pre-trained model."""
        if init == "pretrained":
            if self.pretrained is None:
                raise GlpError(f"{method} with init=pretrained needs the pre-trained model, "
                               "and this run has none; use init=teacher")
            return self.pretrained(), self.model
        return self.model, self.teacher()

    @functools.cached_property
    def train(self) -> Any:
        return self.load_train() if self.load_train else None

    @functools.cached_property
    def selection(self) -> Any:
        return self.load_selection() if self.load_selection else None


@dataclass
class Outcome:
    """What a method's ``run`` returns: the compressed model (cut to ``plan`` and carrying
    it, as :func:`glp.core.surgery.apply_plan` leaves it), one record per phase
    (``phase, steps, seconds, final_loss, diverged``), and details to log."""

    model: Any
    plan: Any  # glp.core.plan.Plan
    phases: list[dict]
    diverged: bool = False
    details: dict[str, float | int | str] = field(default_factory=dict)


def phase_record(name: str, stats: Any) -> dict:
    """A phase record from a training run on the task's data (its statistics,
    ``glp.training.train.TrainStats``): ``examples`` (the rows it trained on, repeats
    counted) marks a phase that trains on the task data, and counts in a model's total
    training (:func:`trained_on_task`)."""
    return {"phase": name, "steps": stats.steps, "examples": stats.examples,
            "seconds": round(stats.seconds, 3), "final_loss": stats.final_loss,
            "diverged": stats.diverged}


FROM_PRETRAINED = "from_pretrained"
"""The detail a method's :class:`Outcome` sets (to 1) when its model started from the
pre-trained weights and learned nothing from its source model (no distillation from it):
the source's training is then not part of the model's (:func:`trained_on_task`)."""


def trained_on_task(phases: Iterable[Mapping[str, Any]], train_rows: int) -> tuple[float, int]:
    """A method's training on the task data: (epochs, optimizer steps) of the phases that
    record the ``examples`` they trained on (others, e.g. an autoencoder trained on weight
    rows, do not count)."""
    task = [p for p in phases if p.get("examples") is not None]
    examples = sum(p["examples"] for p in task)
    return (examples / train_rows if train_rows else 0.0), sum(int(p["steps"]) for p in task)


@dataclass(frozen=True)
class Setting:
    """One setting of a method beside its reference implementation's.

    ``reference`` is the reference's value as its code sets it; glp's is the default of
    the params field ``param``, or ``fixed`` where no parameter holds it (a fine-tune
    option, a constant in the algorithm). ``why`` says why glp's differs; empty when it
    does not (a test refuses a difference without a reason).
    """

    name: str
    reference: str
    param: str | None = None
    fixed: str | None = None
    why: str = ""


@dataclass(frozen=True)
class Method:
    """One compression method, as the registry knows it (see the module docstring)."""

    name: str
    family: str
    summary: str
    params: type | None = None
    budget: str | None = None  # the params field a comparison sizes: "density" or "ratio"
    needs: frozenset[str] = frozenset()
    run: str | Callable[[Context, Any], Outcome] | None = None  # "module:function"
    check: str | Callable[[Any, Any], None] | None = None  # (meta-device model, params)
    deterministic: bool = False  # every seed gives the same model: one seed is enough
    first_only: bool = False  # starts from the unpruned model only (first in a composition)
    followed_by: frozenset[str] = frozenset()  # families that may come after it
    variant: Callable[[Any], str] | None = None  # a variant's prefix, e.g. "svd"
    suffix: Callable[[Any], str] | None = None  # of the registered name, e.g. "-fisher"
    reference: str = ""  # the reference implementation: paper and code
    settings: tuple[Setting, ...] = ()  # beside the reference's (docs/methods.md's table)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise GlpError(f"method {self.name}: family {self.family!r}; choose one of "
                           f"{', '.join(FAMILIES)}")
        if self.family != "layers":
            if self.params is None or not dataclasses.is_dataclass(self.params):
                raise GlpError(f"method {self.name}: params must be a dataclass")
            if self.budget not in BUDGETS or self.budget not in self.param_names():
                raise GlpError(f"method {self.name}: budget must be a params field, one of "
                               f"{', '.join(BUDGETS)}")
            if self.run is None:
                raise GlpError(f"method {self.name}: run (module:function) is missing")
        missing = [s.param for s in self.settings if s.param
                   and s.param not in self.param_names()]
        if missing:
            raise GlpError(f"method {self.name}: settings name no parameter {missing}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise GlpError(f"method {self.name}: needs {sorted(unknown)}; choose from "
                           f"{', '.join(NEEDS)}")

    @property
    def module(self) -> str:
        """The module that holds the algorithm (what a task's code fingerprint covers)."""
        if isinstance(self.run, str):
            return self.run.partition(":")[0]
        return getattr(self.run, "__module__", None) or type(self).__module__

    def implementation(self) -> Callable[[Context, Any], Outcome]:
        return _resolve(self.run)

    def check_model(self, model: Any, params: Any) -> None:
        """Refuse a budget this model cannot meet (on a meta-device copy), before any run."""
        if self.check is not None:
            _resolve(self.check)(model, params)

    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.params)) if self.params else ()

    def options(self) -> dict[str, dataclasses.Field]:
        """The method's parameters by option name (``grain_start`` for ``start``)."""
        if self.params is None:
            return {}
        return {f.metadata.get("option", f.name): f for f in dataclasses.fields(self.params)}

    def options_by_field(self) -> dict[str, str]:
        """The option name of each parameter field (``start``: ``grain_start``)."""
        return {field: option for option, field in
                ((o, f.name) for o, f in self.options().items())}

    def make_params(self, values: Mapping[str, Any] | None = None, **budget: Any) -> Any:
        """The params dataclass from option-named values (unknown names are an error; None
        means the method's default), validated by the dataclass."""
        by_option = self.options()
        given = {**(values or {}), **budget}
        unknown = sorted(set(given) - set(by_option) - set(self.param_names()))
        if unknown:
            raise GlpError(f"{self.name} has no parameter {', '.join(unknown)}; its "
                           f"parameters: {', '.join(by_option)}")
        kwargs = {}
        for name, value in given.items():
            if value is None:
                continue
            target = by_option[name].name if name in by_option else name
            kwargs[target] = tuple(value) if isinstance(value, list) else value
        return self.params(**kwargs)

    def label(self, params: Any) -> str:
        """The variant of a model this method made with ``params``: the budget's label,
        after the method's own prefix (``density-30``, ``svd-ratio-4``)."""
        size = budget_label(self.budget, getattr(params, self.budget))
        prefix = self.variant(params) if self.variant else ""
        return f"{prefix}-{size}" if prefix else size


def _resolve(target: str | Callable | None) -> Callable:
    if callable(target):
        return target
    module, _, function = (target or "").partition(":")
    return getattr(importlib.import_module(module), function)


def target_size(row: Mapping[str, Any]) -> tuple[str, float] | None:
    """The budget and size a model was asked for, from its row's ``target_<budget>``
    column (None for a layer strategy's model, which has none)."""
    for budget in BUDGETS:
        value = row.get(f"target_{budget}")
        if value is not None and value == value and value != 0:  # NaN: another budget
            return budget, value
    return None


def budget_label(budget: str, value: float) -> str:
    """A size's label and registry alias (MLflow aliases may not contain a dot):
    ``density-30`` keeps 30% of the encoder weights, ``constraint-60`` 60% of its
    multiply-accumulates, ``ratio-4`` or ``ratio-2p5``
    compresses 4 or 2.5 times."""
    if budget in ("density", "constraint"):
        return f"{budget}-{round(value * 100):02d}"
    return f"ratio-{value:g}".replace(".", "p")


_REGISTRY: dict[str, Method] = {}
_LOADED = False


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make a method known to every command (``compare --methods``, ``compress --method``,
    compositions, reports, ``pick``), as PEFT's ``register_peft_method`` does."""
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] != method:
        raise GlpError(f"a method named {method.name!r} is already registered")
    if not method.name or not all(c.isalnum() or c in "-_" for c in method.name):
        raise GlpError(f"method name {method.name!r}: letters, digits, '-' and '_' only "
                       "('+' joins the steps of a composition)")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for package in BUILTIN:
            importlib.import_module(package)


def all_methods(family: str | Iterable[str] | None = None) -> tuple[Method, ...]:
    """Every registered method (of a family, or of several), in registration order."""
    _load_builtin()
    families = (family,) if isinstance(family, str) else tuple(family or FAMILIES)
    return tuple(m for m in sorted(_REGISTRY.values(), key=_display_rank)
                 if m.family in families)


def _display_rank(method: Method) -> tuple[int, int]:
    """glp's own methods in :data:`BUILTIN` order (whatever imported them first), then
    the others in the order they were registered."""
    order = list(_REGISTRY)
    if method.family == "layers":
        return 0, order.index(method.name)
    for index, package in enumerate(BUILTIN):
        if method.module.startswith(package + "."):
            return index, order.index(method.name)
    return len(BUILTIN), order.index(method.name)


def names(family: str | Iterable[str] | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in all_methods(family))


def get_method(name: str, family: str | Iterable[str] | None = None) -> Method:
    """The method called ``name``, or a GlpError naming what would be valid."""
    for method in all_methods(family):
        if method.name == name:
            return method
    raise ParamError("method", repr(name), f"one of {', '.join(names(family))}")


def is_method(name: str, family: str | Iterable[str] | None = None) -> bool:
    return name in names(family)


def compressors() -> tuple[Method, ...]:
    """The methods that compress a given model (every family but layer strategies)."""
    return all_methods(("width", "offline"))


def compressor_options() -> dict[str, list[tuple[Method, dataclasses.Field]]]:
    """Every compressor's own parameters (not its budget) by option name, with the methods
    that take each and their field (``temperature``: mlpruning's and grain's)."""
    found: dict[str, list[tuple[Method, dataclasses.Field]]] = {}
    for method in compressors():
        for option, spec in method.options().items():
            if option != method.budget:
                found.setdefault(option, []).append((method, spec))
    return found


def options_markdown() -> str:
    """Every compressor and its parameters as Markdown (docs/usage.md holds this text; a
    test keeps it equal to what the dataclasses say)."""
    lines = []
    for method in compressors():
        lines += [f"**{method.name}** ({method.family}, sized by `--{method.budget}`): "
                  f"{method.summary}", "", "| option | default | meaning |",
                  "| --- | --- | --- |"]
        for option, spec in method.options().items():
            default = spec.default if spec.default is not dataclasses.MISSING else ""
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            lines.append(f"| `--{option.replace('_', '-')}` | {default} | "
                         f"{spec.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


def setting_default(method: Method, setting: Setting) -> str:
    """glp's value of a setting: its parameter's default, or the fixed value."""
    if setting.param is None:
        return setting.fixed or ""
    default = {f.name: f for f in dataclasses.fields(method.params)}[setting.param].default
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


def settings_markdown(method: Method) -> str:
    """A method's settings beside its reference's, as a Markdown table (docs/methods.md
    holds it between ``<!-- settings: NAME -->`` and ``<!-- settings: end -->``)."""
    lines = [f"Reference: {method.reference}.", "",
             "| setting | reference | glp default | why they differ |", "| --- | --- | --- | --- |"]
    for s in method.settings:
        option = f" (`--{method.options_by_field()[s.param].replace('_', '-')}`)" if s.param else ""
        lines.append(f"| {s.name}{option} | {s.reference} | {setting_default(method, s)} | "
                     f"{s.why} |")
    return "\n".join(lines)


__all__ = ["BUDGETS", "BUDGET_FIELDS", "EQUAL_TRAINING", "FAMILIES",
           "FROM_PRETRAINED", "LAYER_METHOD", "NEEDS",
           "REFERENCE",
           "Context", "Method", "Outcome", "ParamError", "Setting", "all_methods", "budget_label",
           "check_number", "compressor_options", "compressors", "get_method", "is_method",
           "names", "options_markdown", "param", "phase_record", "register_method",
           "setting_default", "settings_markdown", "target_size", "trained_on_task",
           "unregister_method"]
