"""MLPruning's algorithm: learnable Top-k masks of heads, FFN neurons and weight blocks,
trained with distillation (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from glp.core.anatomy import (
    encoder_layers,
    head_projections,
    head_size,
    kept_layers,
    num_heads,
    removed_layers,
    role_module,
)
from glp.core.errors import GlpError
from glp.core.plan import ROLES, BlockMask, Plan
from glp.core.surgery import apply_plan, block_grid
from glp.methods import Context, Outcome, ParamError, phase_record
from glp.methods.mlpruning import MLPruningConfig
from glp.training.config import FineTuneConfig
from glp.training.distill import Distillation as KnowledgeDistillation
from glp.training.distill import freeze
from glp.training.train import (
    StepCallback,
    TrainStats,
    fine_tune,
    model_device,
    resolve_device,
    total_steps,
)


class TopK(torch.autograd.Function):
    """Keep the top ``ceil(sigmoid(threshold) * n)`` scores (at least one)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        keep = max(1, math.ceil(torch.sigmoid(threshold).item() * scores.numel()))
        mask = torch.zeros_like(scores)
        mask.view(-1)[scores.view(-1).topk(keep).indices] = 1.0
        ctx.save_for_backward(mask)
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad, (grad * mask).sum().view(1)


def adaptive_regulariser(remaining: torch.Tensor, target: float,
                         final_lambda: float) -> torch.Tensor:
    """The reference's regulariser: lambda * (remaining - target)^2 above the target."""
    excess = remaining - target
    if excess.item() <= 0:
        return remaining * 0.0
    penalty = excess.square()
    weight = max(final_lambda * penalty.item() / (1 - target) ** 2, 50.0)
    if penalty.item() < 3e-4:  # close enough: push gently
        weight = 10.0
    return weight * penalty


def shift_to_target(density: Callable[[float], float], target: float) -> float:
    """The largest common threshold shift whose ``density(shift)`` is at most ``target``
    (bisection on the logit scale; ``density`` grows with the shift).

    The learned thresholds decide how the budget is shared between groups, the common
    shift puts the total at the budget: up when training overshot below it, down when
    it stopped above it.
    """
    low, high = MIN_SHIFT, -MIN_SHIFT  # every group at its minimum / keeps everything
    if density(high) <= target:
        return high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if density(middle) <= target else (low, middle)
    return low


MIN_SHIFT = -40.0


@dataclass
class _Group:
    """One layer's heads or neurons: their scores, threshold and weight accounting."""

    layer: int  # original index
    kind: str  # "heads" or "neurons"
    scores: nn.Parameter
    threshold: nn.Parameter
    weights_each: int  # parameters one structure carries (weights and biases)

    @property
    def count(self) -> int:
        return self.scores.numel()

    def mask(self) -> torch.Tensor:
        return TopK.apply(self.scores, self.threshold)

    def kept(self, shift: float = 0.0) -> tuple[int, ...]:
        keep = max(1, math.ceil(torch.sigmoid(self.threshold.detach() + shift).item()
                                * self.count))
        return tuple(sorted(self.scores.detach().topk(keep).indices.tolist()))


class WidthMasks(nn.Module):
    """Learnable head and neuron masks on a model, applied by forward hooks.

    As the reference's: a head's one score masks its rows of the query, key and value
    projections' outputs (and of DeBERTa's relative-position projections where a layer
    has them), which is masking those rows of the weights and biases; its context, and
    its share of the attention output, is zero. A neuron's mask multiplies its output of
    the FFN-input matrix, before the activation (GELU(0) = 0), the reference's rows of
    the FFN-input matrix. Both equal slicing the structure away.
    """

    def __init__(self, model: nn.Module, threshold_init: float = 10.0):
        super().__init__()
        # A layer-pruned model (greedy first, then width) is masked in its remaining
        # layers, which keep their original indices; its density is of those layers.
        self.model_ref = [model]  # not a submodule: the masks' parameters are their own
        self.groups: list[_Group] = []
        self._hooks = []
        size, heads = head_size(model), num_heads(model)
        device = model_device(model)  # the masks live with the model (move it first)
        if device.type == "meta":  # a shape-only model (budget checks): counting only
            device = torch.device("cpu")
        params = nn.ParameterList()
        for original, layer in zip(kept_layers(model), encoder_layers(model), strict=True):
            per_head = sum((linear.in_features + int(linear.bias is not None)) * size
                           for linear in head_projections(model, layer))
            per_head += role_module(model, layer, "output").out_features * size
            ffn_in, ffn_out = role_module(model, layer, "ffn_in"), role_module(model, layer,
                                                                              "ffn_out")
            per_neuron = ffn_in.in_features + 1 + ffn_out.out_features
            head_group = _Group(original, "heads",
                                nn.Parameter(torch.zeros(heads, device=device)),
                                nn.Parameter(torch.full((1,), threshold_init, device=device)),
                                per_head)
            neuron_group = _Group(original, "neurons",
                                  nn.Parameter(torch.zeros(ffn_in.out_features, device=device)),
                                  nn.Parameter(torch.full((1,), threshold_init, device=device)),
                                  per_neuron)
            # Ties at the start (all scores 0) are broken by index, the same on every run.
            for group in (head_group, neuron_group):
                with torch.no_grad():
                    group.scores.add_(torch.linspace(1e-6, 0, group.count, device=device))
                params.extend([group.scores, group.threshold])
                self.groups.append(group)
            for projection in head_projections(model, layer):
                self._hooks.append(projection.register_forward_hook(
                    self._head_hook(head_group, size)))
            self._hooks.append(ffn_in.register_forward_hook(self._neuron_hook(neuron_group)))
        self.params = params
        self.base_parameters = sum(p.numel() for p in encoder_layers(model).parameters())
        variable = sum(g.weights_each * g.count for g in self.groups)
        self.fixed_parameters = self.base_parameters - variable

    @staticmethod
    def _head_hook(group: _Group, size: int):
        def hook(module, args, output):
            mask = group.mask().to(output.dtype).repeat_interleave(size)
            return output * mask
        return hook

    @staticmethod
    def _neuron_hook(group: _Group):
        def hook(module, args, output):
            return output * group.mask().to(output.dtype)
        return hook

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def remaining(self) -> torch.Tensor:
        """The differentiable fraction of encoder weights the thresholds keep."""
        total = torch.tensor(float(self.fixed_parameters), device=self.groups[0].scores.device)
        for group in self.groups:
            ratio = torch.sigmoid(group.threshold).clamp(min=1.0 / group.count)
            total = total + ratio.sum() * group.weights_each * group.count
        return total / self.base_parameters

    def density(self, shift: float = 0.0) -> float:
        """The exact fraction of encoder weights the current masks keep."""
        kept = self.fixed_parameters + sum(len(g.kept(shift)) * g.weights_each
                                           for g in self.groups)
        return kept / self.base_parameters

    def plan(self, num_layers: int, target: float | None = None) -> tuple[Plan, float]:
        """The plan of the current masks and the threshold shift used to meet ``target``
        (see :func:`shift_to_target`)."""
        shift = 0.0 if target is None else shift_to_target(self.density, target)
        heads = {g.layer: g.kept(shift) for g in self.groups if g.kind == "heads"}
        neurons = {g.layer: g.kept(shift) for g in self.groups if g.kind == "neurons"}
        # A group that keeps everything is left out: the plan names only what it cuts.
        counts = {(g.kind, g.layer): g.count for g in self.groups}
        heads = {k: v for k, v in heads.items() if len(v) < counts["heads", k]}
        neurons = {k: v for k, v in neurons.items() if len(v) < counts["neurons", k]}
        return Plan(num_layers=num_layers, heads=heads, neurons=neurons), shift


class BlockMasks(nn.Module):
    """Learnable block masks (level 3) on every matrix of the encoder layers, applied by
    multiplying each weight with its expanded block mask (a parametrisation)."""

    def __init__(self, model: nn.Module, size: int, threshold_init: float = 10.0):
        super().__init__()
        from torch.nn.utils import parametrize

        self.size = size
        self.entries: list[tuple[str, nn.Linear, nn.Parameter, nn.Parameter]] = []
        params = nn.ParameterList()
        for original, layer in zip(kept_layers(model), encoder_layers(model), strict=True):
            for role in ROLES:
                linear = role_module(model, layer, role)
                rows, cols = block_grid(linear.weight.shape, size)
                # Scores start at each block's mean |weight| (a magnitude prior: a short
                # CPU run cannot learn an order from equal scores as 20 epochs can).
                magnitude = _block_means(linear.weight.detach().abs(), size, rows, cols)
                scores = nn.Parameter(magnitude / magnitude.max().clamp(min=1e-12))
                threshold = nn.Parameter(torch.full((1,), threshold_init,
                                                    device=linear.weight.device))
                params.extend([scores, threshold])
                parametrize.register_parametrization(
                    linear, "weight", _BlockMasking(scores, threshold, size))
                self.entries.append((f"{original}.{role}", linear, scores, threshold))
        self.params = params
        self.total = sum(linear.weight.numel() for _, linear, _, _ in self.entries)

    def remaining(self) -> torch.Tensor:
        kept = sum(torch.sigmoid(t).sum() * linear.weight.numel()
                   for _, linear, _, t in self.entries)
        return kept / self.total

    def _kept(self, scores, threshold, shift: float = 0.0) -> torch.Tensor:
        keep = max(1, math.ceil(torch.sigmoid(threshold.detach() + shift).item()
                                * scores.numel()))
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        mask[scores.detach().view(-1).topk(keep).indices] = True
        return mask

    def density(self, shift: float = 0.0) -> float:
        """The fraction of the matrices' weights in kept blocks (edge blocks counted
        whole: close enough to choose a shift)."""
        kept = sum(self._kept(s, t, shift).float().mean().item() * linear.weight.numel()
                   for _, linear, s, t in self.entries)
        return kept / self.total

    def finish(self, target: float) -> dict[str, BlockMask]:
        """Bake the masks into the weights (zeros), drop the parametrisations, and return
        the masks for the plan; the thresholds are shifted down to meet ``target``."""
        from torch.nn.utils import parametrize

        shift = shift_to_target(self.density, target)
        masks = {}
        for key, linear, scores, threshold in self.entries:
            kept = self._kept(scores, threshold, shift)
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            with torch.no_grad():
                element = kept.float().view(scores.shape).repeat_interleave(self.size, 0)
                element = element.repeat_interleave(self.size, 1)
                linear.weight.mul_(element[: linear.weight.shape[0], : linear.weight.shape[1]])
            kept = kept.cpu().tolist()
            masks[key] = BlockMask.from_kept(self.size, *scores.shape, kept)
        return masks


def _block_means(weight: torch.Tensor, size: int, rows: int, cols: int) -> torch.Tensor:
    padded = torch.zeros(rows * size, cols * size, dtype=weight.dtype, device=weight.device)
    padded[: weight.shape[0], : weight.shape[1]] = weight
    return padded.view(rows, size, cols, size).mean(dim=(1, 3))


class _BlockMasking(nn.Module):
    def __init__(self, scores: nn.Parameter, threshold: nn.Parameter, size: int):
        super().__init__()
        self.scores_ref, self.threshold_ref, self.size = [scores], [threshold], size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = TopK.apply(self.scores_ref[0], self.threshold_ref[0])
        full = mask.repeat_interleave(self.size, 0).repeat_interleave(self.size, 1)
        return weight * full[: weight.shape[0], : weight.shape[1]].to(weight.dtype)


class Distillation(KnowledgeDistillation):
    """MLPruning's distillation loss, as the reference's (masked_run_glue.py):
    ``alpha_distil x (KL(T) x T^2 + hidden_weight x sum of the hidden-state MSEs +
    attention_weight x sum of the attention-probability MSEs) + alpha_ce x task loss``
    (for regression the MSE to the teacher's scores replaces the KL term), plus the
    adaptive regulariser of the masks when there are masks, whose scores and thresholds
    train at their own learning rate.

    The hidden states are the embeddings' output and every layer's; a layer-pruned
    student's layer is compared with the teacher's layer of the same original index. A
    head-pruned (sliced) student's attention is compared with the teacher's kept heads.
    """

    def __init__(self, teacher: nn.Module | None, config: MLPruningConfig,
                 masks: WidthMasks | BlockMasks | None = None, target: float = 1.0,
                 mask_lr: float = 1e-2):
        super().__init__(teacher, config.temperature, config.alpha_distil, config.alpha_ce)
        self.config, self.masks, self.target, self.mask_lr = config, masks, target, mask_lr
        self.terms: dict[str, float] = {}  # the last batch's loss terms (logging, tests)

    def param_groups(self) -> list[dict]:
        if self.masks is None:
            return []
        return [{"params": list(self.masks.params), "lr": self.mask_lr}]

    def forward_kwargs(self) -> dict:
        if self.teacher is None:
            return {}
        kwargs = {}
        if self.config.hidden_weight:
            kwargs["output_hidden_states"] = True
        if self.config.attention_weight:
            kwargs["output_attentions"] = True
        return kwargs

    def distillation(self, model, outputs, batch) -> torch.Tensor:
        """The distillation loss (before ``alpha_distil``) of one batch."""
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            teacher = self.teacher(**inputs, **self.forward_kwargs())
        if outputs.logits.shape[-1] == 1:  # regression: match the teacher's scores
            logits = nn.functional.mse_loss(outputs.logits, teacher.logits)
        else:
            t = self.temperature
            logits = nn.functional.kl_div(
                nn.functional.log_softmax(outputs.logits / t, dim=-1),
                nn.functional.softmax(teacher.logits / t, dim=-1),
                reduction="batchmean") * t**2
        loss, self.terms = logits, {"logits": logits.item()}
        if self.config.hidden_weight:
            hidden = hidden_mse(model, outputs.hidden_states, teacher.hidden_states)
            loss = loss + self.config.hidden_weight * hidden
            self.terms["hidden"] = hidden.item()
        if self.config.attention_weight:
            attention = attention_mse(model, outputs.attentions, teacher.attentions)
            loss = loss + self.config.attention_weight * attention
            self.terms["attention"] = attention.item()
        return loss

    def loss(self, model, outputs, batch, step, steps):
        if self.teacher is None:
            loss = outputs.loss
        else:
            loss = (self.alpha_distil * self.distillation(model, outputs, batch)
                    + self.alpha_ce * outputs.loss)
        if self.masks is not None:
            loss = loss + adaptive_regulariser(self.masks.remaining(), self.target,
                                               self.config.final_lambda)
        return loss


def _teacher_layers(student: nn.Module, student_count: int, teacher_count: int) -> list[int]:
    """The teacher's layer index for each of the student's layers: the same position, or
    for a layer-pruned student of an unpruned teacher, the layer's original index."""
    if student_count == teacher_count:
        return list(range(student_count))
    kept = kept_layers(student)
    if len(kept) != student_count or max(kept, default=-1) >= teacher_count:
        raise GlpError(f"MLPruning's distillation: a student of {student_count} layers and "
                       f"a teacher of {teacher_count} do not correspond")
    return kept


def hidden_mse(student: nn.Module, student_states, teacher_states) -> torch.Tensor:
    """The sum over the embeddings' output and every layer's of the hidden states' mean
    squared error (the reference's ``rep_loss``)."""
    layers = _teacher_layers(student, len(student_states) - 1, len(teacher_states) - 1)
    pairs = zip(student_states, [teacher_states[0], *(teacher_states[i + 1] for i in layers)],
                strict=True)
    return sum(nn.functional.mse_loss(s, t) for s, t in pairs)


def attention_mse(student: nn.Module, student_probs, teacher_probs) -> torch.Tensor:
    """The sum over the layers of the attention probabilities' mean squared error (the
    reference's ``att_loss``); a sliced student's kept heads are compared with the same
    heads of the teacher's."""
    layers = _teacher_layers(student, len(student_probs), len(teacher_probs))
    plan = getattr(student, "glp_plan", None)
    originals = kept_layers(student)
    total = student_probs[0].new_zeros(())
    for position, (probs, layer) in enumerate(zip(student_probs, layers, strict=True)):
        target = teacher_probs[layer]
        if probs.shape[1] != target.shape[1]:
            kept = plan.heads.get(originals[position]) if plan is not None else None
            if kept is None or len(kept) != probs.shape[1]:
                raise GlpError("MLPruning's distillation: the student's heads of layer "
                               f"{originals[position]} do not correspond to the teacher's")
            target = target[:, list(kept)]
        total = total + nn.functional.mse_loss(probs, target)
    return total


class eager_attention:  # noqa: N801 (a context manager, used as a function)
    """Run ``models`` with the family's eager attention while inside (PyTorch's fused
    attention returns no probabilities), and restore their attention afterwards."""

    def __init__(self, *models: nn.Module | None, on: bool = True):
        self.models = [m for m in models if m is not None] if on else []
        self.previous: list[str | None] = []

    def __enter__(self):
        for model in self.models:
            self.previous.append(getattr(model.config, "_attn_implementation", None))
            model.set_attn_implementation("eager")
        return self

    def __exit__(self, *exc):
        for model, previous in zip(self.models, self.previous, strict=True):
            if previous and previous != "eager":
                model.set_attn_implementation(previous)
        return False


def mask_lr_for(config: MLPruningConfig, target: float, examples: int,
                phase: FineTuneConfig) -> float:
    """The mask learning rate: the configured one, or one scaled so that the thresholds
    can travel from their start to the target's logit within the run."""
    if config.mask_lr is not None:
        return config.mask_lr
    target = min(target, 1 - 1e-6)
    distance = max(0.0, config.threshold_init - math.log(target / (1 - target)))
    return max(1e-2, 2 * distance / total_steps(examples, phase))


@dataclass
class MLPruningResult:
    """What a run produced: the plan, the threshold shift that met the budget, and the
    training statistics of each phase."""

    plan: Plan
    shift: float
    stats: dict[str, TrainStats] = field(default_factory=dict)
    remaining_after_training: float = 1.0  # the kept fraction the thresholds reached


def _phase(finetune: FineTuneConfig, epochs: float) -> FineTuneConfig:
    return finetune.__class__(**{**finetune.to_dict(), "epochs": epochs})


_freeze = freeze


def check_density(model: nn.Module, density: float | MLPruningConfig) -> None:
    """Refuse a density below what one head and one neuron per layer keep."""
    if isinstance(density, MLPruningConfig):
        density = density.density
    masks = WidthMasks(model)
    smallest = masks.density(MIN_SHIFT)
    masks.remove()
    if smallest > density:
        lowest = math.ceil(smallest * 100) / 100
        raise ParamError("density", density, (
            f"a density in [{lowest:.2f}, 1] (this model keeps at least {smallest:.3f} of "
            "its encoder weights with one head and one FFN neuron per layer)"))


def train_width_masks(model: nn.Module, teacher: nn.Module, dataset,
                      finetune: FineTuneConfig, config: MLPruningConfig, *, seed: int,
                      device: str = "cpu", on_step: StepCallback | None = None
                      ) -> MLPruningResult:
    """Levels 1-2: masked distillation training of ``model`` (a copy of the teacher), then
    slicing to the plan that meets ``config.density``. ``model`` is cut in place."""
    check_density(model, config.density)
    _freeze(teacher, device)
    model.to(resolve_device(device))  # the masks are made where the model is
    removed = tuple(removed_layers(model))  # layers first (a composition): kept in the plan
    num_layers = len(kept_layers(model)) + len(removed)
    masks = WidthMasks(model, config.threshold_init)
    phase = _phase(finetune, config.pruning_epochs)
    objective = Distillation(teacher, config, masks, config.density,
                             mask_lr_for(config, config.density, len(dataset), phase))
    with eager_attention(model, teacher, on=config.attention_weight > 0):
        stats = fine_tune(model, dataset, phase, seed=seed, device=device,
                          objective=objective, on_step=on_step)
    masks.remove()
    plan, shift = masks.plan(num_layers, config.density)
    if removed:
        plan = Plan(num_layers, removed, plan.heads, plan.neurons, plan.blocks)
    result = MLPruningResult(plan=plan, shift=shift, stats={"heads+neurons": stats},
                             remaining_after_training=masks.density())
    if not stats.diverged:
        apply_plan(model, plan)
    return result


def distil(model: nn.Module, teacher: nn.Module, dataset, finetune: FineTuneConfig,
           config: MLPruningConfig, *, seed: int, device: str = "cpu",
           on_step: StepCallback | None = None) -> TrainStats:
    """The brief distillation fine-tune of a sliced model (``config.final_epochs``)."""
    _freeze(teacher, device)
    with eager_attention(model, teacher, on=config.attention_weight > 0):
        return fine_tune(model, dataset, _phase(finetune, config.final_epochs), seed=seed,
                         device=device, objective=Distillation(teacher, config),
                         on_step=on_step)


def train_block_masks(model: nn.Module, teacher: nn.Module, dataset,
                      finetune: FineTuneConfig, config: MLPruningConfig, *, seed: int,
                      device: str = "cpu", on_step: StepCallback | None = None
                      ) -> tuple[dict[str, BlockMask], TrainStats]:
    """Level 3: learnable block masks of ``config.block_size`` on every remaining matrix,
    trained with distillation towards ``config.block_density``; the pruned blocks are
    zeroed in place. Returns the masks (for the plan) and the training statistics."""
    _freeze(teacher, device)
    model.to(resolve_device(device))
    blocks = BlockMasks(model, config.block_size, config.threshold_init)
    phase = _phase(finetune, config.block_epochs)
    objective = Distillation(teacher, config, blocks, config.block_density,
                             mask_lr_for(config, config.block_density, len(dataset), phase))
    with eager_attention(model, teacher, on=config.attention_weight > 0):
        stats = fine_tune(model, dataset, phase, seed=seed, device=device,
                          objective=objective, on_step=on_step)
    return blocks.finish(config.block_density), stats


def prune_width(model: nn.Module, teacher: nn.Module, dataset, finetune: FineTuneConfig,
                config: MLPruningConfig, *, seed: int, device: str = "cpu") -> MLPruningResult:
    """MLPruning of ``model`` (a copy of the fine-tuned teacher), in place, all phases:
    masked training of heads and neurons, slicing, a distillation fine-tune, and with
    ``config.block_size`` the block masks (level 3).

    Returns:
        The plan (with blocks for level 3) and every phase's statistics.
    """
    result = train_width_masks(model, teacher, dataset, finetune, config, seed=seed,
                               device=device)
    if result.stats["heads+neurons"].diverged:
        return result
    if config.final_epochs:
        result.stats["fine-tune"] = distil(model, teacher, dataset, finetune, config,
                                           seed=seed + 1, device=device)
    if config.block_size and not any(s.diverged for s in result.stats.values()):
        masks, result.stats["blocks"] = train_block_masks(
            model, teacher, dataset, finetune, config, seed=seed + 2, device=device)
        result.plan = with_blocks(result.plan, masks)
        model.glp_plan = result.plan
    return result


def with_blocks(plan: Plan, blocks: dict[str, BlockMask]) -> Plan:
    return Plan(plan.num_layers, plan.removed, plan.heads, plan.neurons, blocks)


def run(context: Context, config: MLPruningConfig) -> Outcome:
    """MLPruning of ``context.model`` (a copy of the fine-tuned teacher), in place, as the
    registry calls it: masked training of heads and neurons with distillation, slicing, a
    distillation fine-tune of the sliced model, and with ``config.block_size`` the block
    masks (level 3). A diverged phase ends the run; its plan is the one it was heading for.

    The student is a copy of the fine-tuned teacher (``init="teacher"``) or the
    pre-trained model it was fine-tuned from, with a new task head (``init="pretrained"``,
    the reference's; then ``context.model`` is the teacher).

    Raises:
        GlpError: ``init="pretrained"`` for a model given already fine-tuned (the
            pre-trained model it came from is unknown).
    """
    label = f"mlpruning density {config.density}"
    model, teacher = context.student_and_teacher(config.init, "MLPruning")
    on_step, close = context.progress(f"{label}: masks")
    try:
        result = train_width_masks(model, teacher, context.train, context.config, config,
                                   seed=context.seed, device=context.device, on_step=on_step)
    finally:
        close()
    stats = result.stats["heads+neurons"]
    phases = [phase_record("heads+neurons", stats)]
    details = {"threshold_shift": result.shift,
               "kept_by_thresholds": round(result.remaining_after_training, 4)}
    if stats.diverged:
        return Outcome(model, result.plan, phases, True, details)
    model.to("cpu")  # each phase starts from the CPU, as a model loaded from disk would
    if config.final_epochs:
        on_step, close = context.progress(f"{label}: fine-tune")
        try:
            stats = distil(model, teacher, context.train, context.config, config,
                           seed=context.seed + 1, device=context.device, on_step=on_step)
        finally:
            close()
        phases.append(phase_record("fine-tune", stats))
    plan = result.plan
    if config.block_size and not any(p["diverged"] for p in phases):
        on_step, close = context.progress(f"{label}: blocks")
        try:
            masks, stats = train_block_masks(model, teacher, context.train, context.config,
                                             config, seed=context.seed + 2,
                                             device=context.device, on_step=on_step)
        finally:
            close()
        plan = with_blocks(plan, masks)
        model.glp_plan = plan
        phases.append(phase_record("blocks", stats))
    return Outcome(model, plan, phases, any(p["diverged"] for p in phases), details)
