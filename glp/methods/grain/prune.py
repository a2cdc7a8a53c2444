"""GRAIN's algorithm: Taylor importance of intra-head dimensions and neurons, pruned on a
cubic schedule during distillation with gradient separation (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from glp.core.anatomy import (
    PLAN_ATTR,
    encoder_layers,
    head_projections,
    head_size,
    kept_layers,
    num_heads,
    removed_layers,
    role_module,
)
from glp.core.errors import GlpError
from glp.core.plan import EMBEDDINGS, Plan, plan_of_model
from glp.core.surgery import apply_plan
from glp.methods import Context, Outcome, ParamError, phase_record
from glp.methods.grain import GrainConfig
from glp.training.config import FineTuneConfig
from glp.training.train import (
    Objective,
    StepCallback,
    TrainStats,
    fine_tune,
    model_device,
    resolve_device,
)


def schedule(step: int, steps: int, config: GrainConfig, target: float) -> float:
    """The kept fraction after optimisation step ``step`` (1-based) of ``steps``: 1 until
    ``start``, a cubic fall to ``target`` until ``end``, then ``target``."""
    first, last = int(config.start * steps), int(config.end * steps)
    if step <= first:
        return 1.0
    if step >= last:
        return target
    remaining = 1 - (step - first) / (last - first)
    return target + (1 - target) * remaining**3


def ema(previous: torch.Tensor, update: torch.Tensor, beta: float) -> torch.Tensor:
    """The reference's moving average: ``beta * previous + (1 - beta) * update``."""
    return previous * beta + update * (1 - beta)


@dataclass
class _Layer:
    original: int
    qk: list[nn.Linear]  # every projection whose rows are query/key dimensions
    query: nn.Linear
    value: nn.Linear
    output: nn.Linear
    ffn_out: nn.Linear


class DimMasks:
    """0/1 masks of every layer's query/key dimensions, value/output dimensions and FFN
    neurons, applied by forward hooks (a masked structure computes exactly what slicing
    it away would), with their importance scores."""

    KINDS = ("ffn", "qk", "vo")

    def __init__(self, model: nn.Module):
        if removed_layers(model) or not plan_of_model(model).width_part().is_layers_only:
            raise GlpError("GRAIN starts from the unpruned model (this one is already "
                           "pruned); remove layers with a plan afterwards")
        self.heads, self.size = num_heads(model), head_size(model)
        device = model_device(model)
        if device.type == "meta":
            device = torch.device("cpu")
        self.layers: list[_Layer] = []
        for original, layer in zip(kept_layers(model), encoder_layers(model), strict=True):
            value = role_module(model, layer, "value")
            qk = [p for p in head_projections(model, layer) if p is not value]
            self.layers.append(_Layer(original, qk, role_module(model, layer, "query"), value,
                                      role_module(model, layer, "output"),
                                      role_module(model, layer, "ffn_out")))
        n, width = len(self.layers), self.heads * self.size
        neurons = self.layers[0].ffn_out.in_features
        self.masks = {"ffn": torch.ones(n, neurons, device=device),
                      "qk": torch.ones(n, width, device=device),
                      "vo": torch.ones(n, width, device=device)}
        self.scores = {k: torch.zeros_like(v) for k, v in self.masks.items()}
        self.updates = {k: torch.zeros_like(v) for k, v in self.masks.items()}
        first = self.layers[0]
        hidden = first.output.out_features
        self.unit = {  # parameters one structure carries
            "ffn": role_module(model, encoder_layers(model)[0], "ffn_in").in_features + 1
            + first.ffn_out.out_features,
            "qk": sum(p.in_features + int(p.bias is not None) for p in first.qk),
            "vo": first.value.in_features + int(first.value.bias is not None) + hidden,
        }
        self.base = sum(p.numel() for p in encoder_layers(model).parameters())
        self.variable = sum(self.unit[k] * self.masks[k].numel() for k in self.KINDS)
        self.fixed = self.base - self.variable
        self._hooks = []
        for index, layer in enumerate(self.layers):
            for projection in layer.qk:
                self._hooks.append(projection.register_forward_hook(self._output_hook("qk", index)))
            self._hooks.append(layer.value.register_forward_hook(self._output_hook("vo", index)))
            self._hooks.append(layer.ffn_out.register_forward_pre_hook(self._input_hook(index)))

    def _output_hook(self, kind: str, index: int):
        def hook(module, args, output):
            return output * self.masks[kind][index].to(output.dtype)
        return hook

    def _input_hook(self, index: int):
        def hook(module, args):
            return (args[0] * self.masks["ffn"][index].to(args[0].dtype), *args[1:])
        return hook

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # --- importance -----------------------------------------------------------------

    @torch.no_grad()
    def gather(self) -> None:
        """Add this batch's Taylor scores (from the gradients now on the weights). A batch
        with a non-finite gradient anywhere adds nothing (as the reference skips it)."""
        weights = [(layer.ffn_out.weight, layer.query.weight, layer.output.weight)
                   for layer in self.layers]
        if any(w.grad is None for group in weights for w in group):
            return
        if not all(torch.isfinite(w.grad).all() for group in weights for w in group):
            return
        for index, (layer, (ffn, query, output)) in enumerate(zip(self.layers, weights,
                                                                  strict=True)):
            self.updates["ffn"][index] += (ffn.grad * ffn).sum(0).abs()
            qk = (query.grad * query).sum(1)
            if layer.query.bias is not None and layer.query.bias.grad is not None:
                qk = qk + layer.query.bias.grad * layer.query.bias
            self.updates["qk"][index] += qk.abs()
            self.updates["vo"][index] += (output.grad * output).sum(0).abs()

    def update(self, beta: float, head_alpha: float, alpha: float) -> None:
        """Fold the gathered scores into the EMA, with the structure regulariser."""
        vo = self.masks["vo"]
        head_kept = vo.view(len(self.layers), self.heads, self.size).mean(-1, keepdim=True)
        per_head = torch.tanh(head_kept / head_alpha).expand(-1, -1, self.size)
        self.updates["vo"] *= per_head.reshape(vo.shape) * torch.tanh(
            vo.mean(-1, keepdim=True) / alpha)
        self.updates["ffn"] *= torch.tanh(self.masks["ffn"].mean(-1, keepdim=True) / alpha)
        for kind in self.KINDS:
            self.scores[kind] = ema(self.scores[kind], self.updates[kind], beta)
            self.updates[kind].zero_()
            self.scores[kind] = torch.where(self.masks[kind] > 0, self.scores[kind],
                                            torch.full_like(self.scores[kind], -math.inf))

    # --- pruning --------------------------------------------------------------------

    def prunable_target(self, density: float) -> float:
        """The kept fraction of the prunable structures that gives ``density`` of all
        encoder weights (LayerNorms and output biases stay)."""
        return max(0.0, (density * self.base - self.fixed) / self.variable)

    def prune_to(self, kept: float) -> None:
        """Prune the least important structures (globally, by parameters) until at most
        ``kept`` of the prunable weights remain; never un-prune; every layer keeps its
        best value/output dimension and FFN neuron."""
        scores = {k: v.clone() for k, v in self.scores.items()}
        for kind in ("ffn", "vo"):  # the floors
            best = scores[kind].argmax(-1, keepdim=True)
            scores[kind].scatter_(-1, best, math.inf)
        flat = torch.cat([scores[k].reshape(-1) for k in self.KINDS])
        sizes = torch.cat([torch.full((self.masks[k].numel(),), self.unit[k] / self.variable,
                                      device=flat.device, dtype=torch.float64)
                           for k in self.KINDS])
        order = torch.argsort(flat, stable=True)
        mass = torch.cumsum(sizes[order], 0)
        zeros = int(torch.searchsorted(mass, torch.tensor(1 - kept - 1e-12, device=mass.device,
                                                          dtype=torch.float64)).item()) + 1
        zeros = min(max(0, zeros if kept < 1 else 0), int((flat < math.inf).sum()))
        cut = torch.zeros_like(flat, dtype=torch.bool)
        cut[order[:zeros]] = True
        start = 0
        for kind in self.KINDS:
            count = self.masks[kind].numel()
            self.masks[kind][cut[start: start + count].view_as(self.masks[kind])] = 0
            start += count
        # A head without value dimensions is gone: its query/key dimensions too.
        vo_heads = self.masks["vo"].view(len(self.layers), self.heads, self.size).amax(-1)
        qk = self.masks["qk"].view(len(self.layers), self.heads, self.size)
        qk.mul_(vo_heads.unsqueeze(-1))
        for kind in self.KINDS:
            self.scores[kind] = torch.where(self.masks[kind] > 0, self.scores[kind],
                                            torch.full_like(self.scores[kind], -math.inf))

    def density(self) -> float:
        """The fraction of encoder weights the masks keep."""
        kept = sum(self.unit[k] * float(self.masks[k].sum()) for k in self.KINDS)
        return (self.fixed + kept) / self.base

    def plan(self, num_layers: int) -> Plan:
        """The masks as a plan (structures a layer keeps in full are left out)."""
        def kept(kind: str) -> dict[int, tuple[int, ...]]:
            out = {}
            for index, layer in enumerate(self.layers):
                row = self.masks[kind][index]
                if row.min() < 1:
                    out[layer.original] = tuple(torch.nonzero(row).view(-1).tolist())
            return out

        return Plan(num_layers=num_layers, neurons=kept("ffn"), qk=kept("qk"), vo=kept("vo"))


def matching_layers(num_layers: int) -> list[int]:
    """The hidden states matched: 0 (embeddings), 2, 4, ..., and the last layer."""
    layers = list(range(0, num_layers + 1, 2))
    return layers if layers[-1] == num_layers else [*layers, num_layers]


class GrainObjective(Objective):
    """Distillation from the teacher (soft cross-entropy at T, optional hard labels) as the
    prediction loss, the hidden-state MSE as a second part, and the pruner's steps."""

    def __init__(self, teacher: nn.Module, model: nn.Module, masks: DimMasks,
                 config: GrainConfig, finetune: FineTuneConfig):
        self.teacher, self.masks, self.config = teacher, masks, config
        self.target = masks.prunable_target(config.density)
        hidden = model.config.hidden_size  # DistilBERT's config maps it to dim
        self.layers = matching_layers(len(encoder_layers(model)))
        self.maps = nn.ModuleList()
        if config.hidden_weight:
            for _ in self.layers:
                linear = nn.Linear(hidden, hidden, device=model_device(model))
                nn.init.eye_(linear.weight)
                nn.init.zeros_(linear.bias)
                self.maps.append(linear)
        self.lr = finetune.learning_rate
        self.eps = config.adam_epsilon

    def optimizer_options(self) -> dict:
        return {"eps": self.eps}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.maps.parameters()), "lr": self.lr}] if len(self.maps) else []

    def forward_kwargs(self) -> dict:
        return {"output_hidden_states": True} if len(self.maps) else {}

    def prediction_loss(self, outputs, teacher_logits, batch) -> torch.Tensor:
        c = self.config
        logits = outputs.logits
        if logits.shape[-1] == 1:  # regression: match the teacher's scores
            kd = functional.mse_loss(logits, teacher_logits)
        else:
            soft = functional.softmax(teacher_logits / c.temperature, dim=-1)
            kd = -(soft * functional.log_softmax(logits / c.temperature, dim=-1)).sum(-1).mean()
        loss = c.kd_weight * kd
        if c.hard_weight:
            loss = loss + c.hard_weight * outputs.loss
        return loss

    def hidden_loss(self, outputs, teacher_hidden, batch) -> torch.Tensor:
        mask = batch.get("attention_mask")
        total = 0.0
        for linear, index in zip(self.maps, self.layers, strict=True):
            student = linear(outputs.hidden_states[index])
            error = functional.mse_loss(student, teacher_hidden[index], reduction="none")
            if mask is None:
                total = total + error.mean()
            else:
                weight = mask.to(error.dtype).unsqueeze(-1)
                total = total + (error * weight).sum() / (weight.sum() * error.shape[-1])
        return self.config.hidden_weight * total

    def losses(self, model, outputs, batch, step, steps):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher = self.teacher(**inputs, **self.forward_kwargs())
        prediction = self.prediction_loss(outputs, teacher.logits, batch)
        if not len(self.maps):
            return (prediction,)
        hidden = self.hidden_loss(outputs, teacher.hidden_states, batch)
        if self.config.gradient_separation:
            return (prediction, hidden)
        return (prediction + hidden,)

    def after_backward(self, model, part, parts, step, steps):
        if part == 0:
            self.masks.gather()  # the prediction loss's gradients only (when separated)
        if part == parts - 1:
            self.masks.update(self.config.beta, self.config.head_alpha, self.config.alpha)
            first, last = int(self.config.start * steps), int(self.config.end * steps)
            if first < step + 1 <= max(last, first + 1):
                self.masks.prune_to(schedule(step + 1, steps, self.config, self.target))


@dataclass
class GrainResult:
    """What a run produced: the plan and the training statistics."""

    plan: Plan
    stats: dict[str, TrainStats] = field(default_factory=dict)
    density_reached: float = 1.0


def embedding_rank(model: nn.Module, rank: int) -> int:
    """The word-embedding rank to use: ``rank`` when it saves parameters, else 0."""
    if not rank:
        return 0
    vocab, hidden = model.get_input_embeddings().weight.shape
    return rank if rank * (vocab + hidden) < vocab * hidden else 0


def check_density(model: nn.Module, density: float | GrainConfig) -> None:
    """Refuse a density below what one value dimension and one neuron per layer keep."""
    if isinstance(density, GrainConfig):
        density = density.density
    masks = DimMasks(model)
    masks.remove()
    smallest = (masks.fixed + len(masks.layers) * (masks.unit["vo"] + masks.unit["ffn"])) \
        / masks.base
    if smallest > density:
        lowest = math.ceil(smallest * 1000) / 1000
        raise ParamError("density", density, (
            f"a density in [{lowest:.3f}, 1] (this model keeps at least {smallest:.4f} of its "
            "encoder weights with one value dimension and one FFN neuron per layer)"))


def prune(model: nn.Module, teacher: nn.Module, dataset, finetune: FineTuneConfig,
          config: GrainConfig, *, seed: int, device: str = "cpu",
          on_step: StepCallback | None = None) -> GrainResult:
    """GRAIN of ``model`` (a copy of the fine-tuned teacher, or the pre-trained model with
    a new task head), in place: factorised embeddings (optionally), one run of distillation
    training that prunes on the cubic schedule (AdamW with the config's eps and weight
    decay, warm-up over its fraction of the steps), then slicing to the plan. A diverged
    run is not sliced."""
    check_density(model, config.density)
    teacher.eval().to(resolve_device(device))
    for param in teacher.parameters():
        param.requires_grad_(False)
    model.to(resolve_device(device))
    num_layers = len(kept_layers(model))
    rank = embedding_rank(model, config.embedding_rank)
    if rank:
        apply_plan(model, Plan(num_layers, ranks={EMBEDDINGS: rank}))
    masks = DimMasks(model)
    objective = GrainObjective(teacher, model, masks, config, finetune)
    phase = finetune.__class__(**{**finetune.to_dict(), "epochs": config.epochs,
                                  "warmup_ratio": config.warmup,
                                  "weight_decay": config.weight_decay})
    try:
        stats = fine_tune(model, dataset, phase, seed=seed, device=device,
                          objective=objective, on_step=on_step)
    finally:
        masks.remove()
    width = masks.plan(num_layers)
    plan = width.offline(ranks={EMBEDDINGS: rank}) if rank else width
    result = GrainResult(plan=plan, stats={"grain": stats}, density_reached=masks.density())
    if not stats.diverged:
        setattr(model, PLAN_ATTR, None)  # the embeddings are factorised: cut the width too
        apply_plan(model, width)
        setattr(model, PLAN_ATTR, plan)
    return result


def run(context: Context, config: GrainConfig) -> Outcome:
    """GRAIN as the registry calls it: the student is a copy of the fine-tuned teacher
    (``init="teacher"``) or the pre-trained model it was fine-tuned from
    (``init="pretrained"``, the reference's; then ``context.model`` is the teacher); one
    run that prunes and distils, then slicing (see :func:`prune`).

    Raises:
        GlpError: ``init="pretrained"`` for a model given already fine-tuned (the
            pre-trained model it came from is unknown).
    """
    student, teacher = context.student_and_teacher(config.init, "GRAIN")
    on_step, close = context.progress(f"grain density {config.density}: prune + distil")
    try:
        result = prune(student, teacher, context.train, context.config,
                       config, seed=context.seed, device=context.device, on_step=on_step)
    finally:
        close()
    stats = result.stats["grain"]
    return Outcome(student, result.plan, [phase_record("grain", stats)], stats.diverged,
                   {"threshold_shift": 0.0,
                    "kept_by_thresholds": round(result.density_reached, 4)})
