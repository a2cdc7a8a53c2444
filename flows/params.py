"""The parameters of the prune flow (which compare and compress extend) and the checks
every job runs before anything starts: options, device, model, data, search."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from flows.runners import parse_task_runner
from glp import GlpError
from glp.core.models import (
    DEFAULT_MODEL,
    check_supported,
    check_weights,
    num_encoder_layers,
)
from glp.core.models import resolve_model as resolve_model_path
from glp.methods.layers.search import (
    SEARCHES,
    Strategy,
    StrategyOptions,
    get_strategy,
)
from glp.training.config import FineTuneConfig
from glp.training.data import TaskData
from glp.training.train import check_precision, resolve_device
from tasks.data import DataSource, checked_train, load_source

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "glue"
FINAL_SEED_BASE = 40  # the paper's final seeds are 40..44


class PruneParams(BaseModel):
    """Everything a pruning job depends on (validated by Prefect when the flow starts)."""

    model: str = Field(DEFAULT_MODEL, description="local model directory or hub id")
    task: str | None = Field("sst2", description="a GLUE task name (ignored with train_file)")
    data_dir: str | None = Field(None, description="folder of GLUE task folders")
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    task_type: str = "classification"
    metric: str | None = None
    remove: int = Field(2, description="layers to remove (1 to the model's layers - 1: "
                                       "checked against the model)")
    strategy: str = "greedy"
    prefilter_keep: int = Field(0, ge=0, description="greedy: fine-tune only the m candidates "
                                "with the lowest block influence (0 = all)")
    search: str = Field("full", description="greedy: full (the reference protocol), halving "
                        "(successive halving) or warm (from one fine-tuned full model)")
    search_fraction: float | None = Field(None, ge=0.01, le=1, allow_inf_nan=False, description=(
        "greedy: halving's first-rung share of the budget (0.1) or warm's repair (0.25)"))
    random_seed: int = Field(0, description="random: the seed of the random order")
    exhaustive_limit: int = Field(64, ge=1, description="exhaustive: most fine-tunes allowed")
    train_limit: int | None = Field(None, ge=1, description="training examples used")
    eval_limit: int | None = Field(None, ge=1, description="dev examples used")
    epochs: float = Field(3.0, gt=0, allow_inf_nan=False)
    max_length: int = Field(128, ge=8)
    learning_rate: float = Field(2e-5, gt=0, allow_inf_nan=False)
    batch_size: int = Field(32, ge=1)
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False,
                                 description="gradient-norm clipping (0 = off)")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    precision: str = Field("fp32", description="fp32, or bf16/fp16 autocast on a GPU")
    length_grouping: bool = Field(True, description="batches of similar length (faster on CPU)")
    keep_candidates: bool = Field(False, description="keep every search candidate's weights")
    trust_remote_code: bool = Field(False, description="allow a model with custom code")
    seeds: int = Field(5, ge=1, description="seeds per final model (40, 41, ...)")
    distill: bool = Field(False, description=(
        "also fine-tune every pruned depth with knowledge distillation from the unpruned "
        "fine-tuned model (seed 40's), beside the plain fine-tune"))
    distill_temperature: float = Field(2.0, gt=0, allow_inf_nan=False)
    search_seed: int = 41
    split_seed: int = 0
    selection_fraction: float = Field(0.15, gt=0, lt=1, allow_inf_nan=False)
    home: str | None = None
    tracking_uri: str | None = None
    experiment: str = "glp"
    registered_model: str | None = None
    register_models: bool = True
    task_runner: str = Field("sequential", description=(
        "where fine-tunes run: sequential, threads:N, dask, dask:N, dask:tcp://HOST:PORT, "
        "ray, ray:ray://HOST:PORT (flows/runners.py); not part of the job id"))

    @field_validator("task_runner")
    @classmethod
    def _check_task_runner(cls, value: str) -> str:
        return parse_task_runner(value).spec

    def finetune_config(self) -> FineTuneConfig:
        return FineTuneConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_length=self.max_length,
            epochs=self.epochs,
            max_grad_norm=self.max_grad_norm or None,
            precision=self.precision,
            length_grouping=self.length_grouping,
        )

    def strategy_options(self, **overrides) -> StrategyOptions:
        values = {"seed": self.random_seed, "prefilter_keep": self.prefilter_keep,
                  "search": self.search, "search_fraction": self.search_fraction,
                  "exhaustive_limit": self.exhaustive_limit, **overrides}
        return StrategyOptions(**values)

    def source(self) -> DataSource:
        return DataSource(
            task=None if self.train_file else self.task,
            data_dir=self.data_dir or str(DEFAULT_DATA_DIR),
            train_file=self.train_file,
            dev_file=self.dev_file,
            text_columns=self.text_columns,
            label_column=self.label_column,
            task_type=self.task_type,
            metric=self.metric,
            name=Path(self.train_file).stem if self.train_file else "custom",
        )


def check_model(params: PruneParams, strategies: list[Strategy]) -> tuple[str, int]:
    """The local model directory and its layer count, or a GlpError.

    Raises GlpError for an unsupported model, custom model code without
    ``trust_remote_code``, damaged weights, or a budget a strategy cannot search.
    """
    model_path = resolve_model_path(params.model)
    config = check_supported(model_path, trust_remote_code=params.trust_remote_code)
    check_weights(model_path)
    num_layers = num_encoder_layers(config)
    for strategy in strategies:
        strategy.validate(num_layers, params.remove)
    return model_path, num_layers


def check_options(params: PruneParams) -> str:
    """Options that would be silently ignored, and the device; returns the device.

    Raises GlpError naming the option as the user typed it.
    """
    given = params.model_fields_set
    if params.train_file:
        if "task" in given and params.task:
            raise GlpError(f"--task {params.task} and --train-file: choose one (a GLUE task "
                           "or your own data)")
        if params.data_dir:
            raise GlpError("--data-dir is the folder of GLUE tasks; with --train-file it "
                           "would be ignored")
    else:
        if params.text_columns or ("label_column" in given
                                   and params.label_column != "label"):
            option = "--text-column" if params.text_columns else "--label-column"
            raise GlpError(f"{option}: a GLUE task ({params.task}) has its own columns; "
                           f"{option} is for --train-file data")
        if params.dev_file:
            raise GlpError("--dev-file is for your own data and needs --train-file; a GLUE "
                           f"--task ({params.task}) brings its own dev set")
        for name, option in (("task_type", "--task-type"), ("metric", "--metric")):
            value = getattr(params, name)
            if name in given and value is not None:
                raise GlpError(f"{option} {value}: a GLUE task ({params.task}) has its own "
                               f"{name.replace('_', ' ')}; {option} is for --train-file data")
    device = resolve_device(params.device)
    check_precision(params.precision, device)
    return str(device)


def check_inputs(params: PruneParams, strategies: list[Strategy]
                 ) -> tuple[int, TaskData, str]:
    """Every check a run needs before it starts: the options, the device, the model, each
    strategy's budget, and the data (task, files, columns, labels of the subset that will
    be used, the selection split it leaves). Returns the layer count, the loaded data and
    what the job's description adds: a warning line per class its selection split lacks."""
    check_options(params)
    _, num_layers = check_model(params, strategies)
    data = load_source(params.source())
    _, notes = checked_train(data, params.train_limit, params.split_seed,
                             params.selection_fraction)
    return num_layers, data, "".join(f"\nwarning: {note}" for note in notes)


def _strategy_names(params: PruneParams) -> list[str]:
    """The strategies a prune (--strategy) or compare (--strategies) job runs, lower-case."""
    if getattr(params, "methods", None):  # compare --methods: the layer strategies it runs
        from flows.methods import layer_strategies, parse_methods

        return list(layer_strategies(parse_methods(params.methods)))
    value = getattr(params, "strategies", None) or params.strategy
    names = value.split(",") if isinstance(value, str) else list(value)
    return [name.strip().lower() for name in names if name.strip()]


def _runs_greedy(params: PruneParams) -> bool:
    return "greedy" in _strategy_names(params)


def _strategy_option(params: PruneParams) -> str:
    if getattr(params, "methods", None):
        return f"--methods {','.join(params.methods)} has no greedy"
    if "strategies" in type(params).model_fields:
        return f"--strategies {','.join(_strategy_names(params))} has no greedy"
    return f"--strategy is {params.strategy}"


def check_search(params: PruneParams) -> None:
    """--search, --search-fraction and --prefilter-keep, refused in the user's words
    before any strategy is built."""
    if params.prefilter_keep and not _runs_greedy(params):
        raise GlpError(f"--prefilter-keep {params.prefilter_keep}: only the greedy strategy "
                       f"pre-filters ({_strategy_option(params)})")
    if params.search not in SEARCHES:
        raise GlpError(f"--search '{params.search}': choose one of: {', '.join(SEARCHES)}")
    if params.search_fraction is not None and params.search == "full":
        raise GlpError(f"--search-fraction {params.search_fraction:g}: the share of the "
                       "budget is for --search halving or warm (the full search trains "
                       "every candidate for the whole budget)")
    if params.search != "full" and not _runs_greedy(params):
        raise GlpError(f"--search {params.search}: only the greedy strategy searches "
                       f"({_strategy_option(params)})")


def strategy_for(params: PruneParams, name: str, **options) -> Strategy:
    check_search(params)
    return get_strategy(name, params.strategy_options(**options))


def model_slug(model: str) -> str:
    base = DEFAULT_MODEL if model == DEFAULT_MODEL else model.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base).lower()
