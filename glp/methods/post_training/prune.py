"""Post-training pruning (Kwon et al. 2022): Fisher mask search, rearrangement, least-squares
mask tuning, then a plan that slices the pruned heads and neurons away (see the package
docstring).

Masks are applied by forward pre-hooks on two matrices per layer: a head's mask multiplies
its slice of the attention-output matrix's input (its context vector), a neuron's its
column of the FFN-output matrix's input (after the activation). A mask of 0 is therefore
exactly the structure sliced away, and a real-valued mask folds into those two matrices'
columns. The same hooks capture what the least squares need: each sublayer's input to its
output matrix and its residual input (the query projection's input for attention, the
FFN-input matrix's input for the FFN), so that a sublayer's output before its LayerNorm is
``out(x) + residual``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from glp.core.anatomy import (
    PLAN_ATTR,
    encoder_layers,
    head_size,
    kept_layers,
    num_heads,
    removed_layers,
    role_module,
)
from glp.core.plan import Plan
from glp.core.surgery import apply_plan
from glp.methods import Context, Outcome, ParamError
from glp.methods.post_training import PostTrainingParams
from glp.training.data import collate

MAX_SCALE = 10.0
"""A tuned mask beyond ±this ends the tuning (the reference's guard)."""


# ------------------------------------------------------------------ counting


def mac_per_head(seq: float, hidden: int, size: int) -> float:
    """Query, key, value and output projections of one head, and its attention scores."""
    return 4 * seq * hidden * size + 2 * seq * seq * size


def mac_per_neuron(seq: float, hidden: int) -> float:
    return 2 * seq * hidden


def mac_fraction(heads: torch.Tensor, neurons: torch.Tensor, seq: float, hidden: int,
                 size: int) -> float:
    """The MACs kept by 0/non-zero masks (layers x heads, layers x neurons), as a fraction."""
    full = heads.numel() * mac_per_head(seq, hidden, size) + neurons.numel() * mac_per_neuron(
        seq, hidden)
    kept = (int((heads != 0).sum()) * mac_per_head(seq, hidden, size)
            + int((neurons != 0).sum()) * mac_per_neuron(seq, hidden))
    return kept / full


def _shape(model: nn.Module) -> tuple[int, int, int, int, int]:
    layers = encoder_layers(model)
    ffn = role_module(model, layers[0], "ffn_in")
    return len(layers), num_heads(model), head_size(model), ffn.in_features, ffn.out_features


def lowest_constraint(model: nn.Module, seq: float) -> float:
    """The smallest MAC fraction a plan can keep: one head and one neuron per layer."""
    count, heads, size, hidden, neurons = _shape(model)
    one = mac_per_head(seq, hidden, size) + mac_per_neuron(seq, hidden)
    return one / (heads * mac_per_head(seq, hidden, size) + neurons * mac_per_neuron(seq, hidden))


def check(model: nn.Module, params: PostTrainingParams) -> None:
    """Refuse a model already cut in width and a budget below one head and one neuron per
    layer (at a sequence length of 8 tokens, where that share is largest)."""
    plan = getattr(model, PLAN_ATTR, None)
    if plan is not None and not plan.is_layers_only:
        raise ParamError("model", "a model cut in width",
                         "a model with whole heads and FFN neurons (layers may be removed "
                         "first, e.g. greedy+post-training)")
    lowest = lowest_constraint(model, 8.0)
    if params.constraint < lowest:
        raise ParamError("constraint", params.constraint,
                         f"a fraction in [{math.ceil(lowest * 1000) / 1000:.3f}, 1] (one "
                         "head and one FFN neuron per layer)")


# ------------------------------------------------------------------ masks


class StopForward(Exception):
    """Raised by a hook once what a pass needed is captured (the layers above are skipped)."""


class Masked:
    """Head and neuron masks on a model's layers, applied (and captured) by hooks.

    ``heads`` (layers x heads) and ``neurons`` (layers x neurons) are tensors the caller
    may replace; with ``capture = layer`` the hooks keep that layer's sublayer inputs in
    ``captured`` and, with ``stop``, end the forward pass after its FFN.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        count, heads, self.size, _, neurons = _shape(model)
        device = next(model.parameters()).device
        self.heads = torch.ones(count, heads, device=device)
        self.neurons = torch.ones(count, neurons, device=device)
        self.capture: int | None = None
        self.stop = False
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = []
        for index, layer in enumerate(encoder_layers(model)):
            hooks = {"query": self._residual(index, "attention_residual"),
                     "output": self._head_hook(index),
                     "ffn_in": self._residual(index, "ffn_residual"),
                     "ffn_out": self._neuron_hook(index)}
            for role, hook in hooks.items():
                self._handles.append(
                    role_module(model, layer, role).register_forward_pre_hook(hook))

    def _residual(self, index: int, name: str):
        def hook(module, args):
            if self.capture == index:
                self.captured[name] = args[0].detach()
        return hook

    def _head_hook(self, index: int):
        def hook(module, args):
            context = args[0]
            if self.capture == index:
                self.captured["context"] = context.detach()
            shape = context.shape
            mask = self.heads[index].repeat_interleave(self.size)
            return (context * mask.view(*([1] * (len(shape) - 1)), -1),)
        return hook

    def _neuron_hook(self, index: int):
        def hook(module, args):
            hidden = args[0]
            if self.capture == index:
                self.captured["activation"] = hidden.detach()
            masked = hidden * self.neurons[index]
            if self.capture == index and self.stop:
                self.captured["ffn_masked"] = masked.detach()
                raise StopForward
            return (masked,)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _batches(dataset, size: int, pad_id: int, device) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(dataset), size):
        yield collate(dataset, range(start, min(start + size, len(dataset))), pad_id,
                      device=device)


def mask_gradients(model: nn.Module, masked: Masked, batches: list[dict]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch, the task loss's gradient with respect to every head and neuron mask:
    (batches x layers x heads, batches x layers x neurons)."""
    masked.heads.requires_grad_(True)
    masked.neurons.requires_grad_(True)
    heads, neurons = [], []
    try:
        for batch in batches:
            loss = model(**batch).loss
            grad_heads, grad_neurons = torch.autograd.grad(loss, [masked.heads, masked.neurons])
            heads.append(grad_heads.detach())
            neurons.append(grad_neurons.detach())
    finally:
        masked.heads.requires_grad_(False)
        masked.neurons.requires_grad_(False)
    return torch.stack(heads), torch.stack(neurons)


# ------------------------------------------------------------------ search


def search(head_fisher: torch.Tensor, neuron_fisher: torch.Tensor, constraint: float,
           head_mac: float, neuron_mac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 masks that keep the most Fisher information within ``constraint`` of the MACs.

    Each layer keeps its most important head and neuron; the rest are ranked globally, and
    every number of heads is tried, the neurons filling what the heads leave (the
    reference's ``search_mac``).
    """
    layers, heads = head_fisher.shape
    neurons = neuron_fisher.shape[1]
    budget = constraint * (layers * heads * head_mac + layers * neurons * neuron_mac)
    budget -= layers * (head_mac + neuron_mac)
    if budget < -1e-6 * head_mac:
        raise ParamError("constraint", constraint, "a larger fraction: one head and one FFN "
                         "neuron per layer need more")
    head_mask = torch.zeros(layers, heads)
    neuron_mask = torch.zeros(layers, neurons)
    head_mask[torch.arange(layers), head_fisher.argmax(dim=1)] = 1.0
    neuron_mask[torch.arange(layers), neuron_fisher.argmax(dim=1)] = 1.0
    rest_heads = head_fisher.masked_fill(head_mask.bool(), -1.0).flatten()
    rest_neurons = neuron_fisher.masked_fill(neuron_mask.bool(), -1.0).flatten()
    head_values, head_order = rest_heads.sort(descending=True)
    neuron_values, neuron_order = rest_neurons.sort(descending=True)
    free_heads = layers * (heads - 1)
    free_neurons = layers * (neurons - 1)
    neuron_sums = torch.cat([torch.zeros(1), neuron_values[:free_neurons].cumsum(0)])
    head_sums = torch.cat([torch.zeros(1), head_values[:free_heads].cumsum(0)])
    best, chosen = -math.inf, (0, 0)
    for count in range(free_heads + 1):
        left = budget - count * head_mac
        if left < -1e-6 * head_mac:
            break
        fill = min(free_neurons, max(0, int(left / neuron_mac + 1e-9)))
        total = float(head_sums[count] + neuron_sums[fill])
        if total > best:
            best, chosen = total, (count, fill)
    head_mask.view(-1)[head_order[:chosen[0]]] = 1.0
    neuron_mask.view(-1)[neuron_order[:chosen[1]]] = 1.0
    return head_mask, neuron_mask


@torch.no_grad()
def rearrange(mask: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """One layer's 0/1 mask improved with the block-diagonal Fisher (``grads``: batches x
    structures): the pruned set grows one structure at a time, from the least important
    up, and each time the structure whose removal leaves the smallest summed gradient
    vector is kept instead (the reference's ``greedy_rearrange``)."""
    kept = int(mask.sum())
    pruned = mask.numel() - kept
    if kept == 0 or pruned == 0:
        return mask
    vectors = grads.t().contiguous()  # structures x batches
    order = vectors.pow(2).sum(dim=1).argsort().tolist()
    chosen = order[:pruned]
    for index in order[pruned:]:
        chosen.append(index)
        group = vectors[chosen]
        left = (group.sum(dim=0) - group).pow(2).sum(dim=1)
        del chosen[int(left.argmin())]
    new = torch.ones_like(mask)
    new[chosen] = 0.0
    return new


# ------------------------------------------------------------------ least squares


def _tokens(tensor: torch.Tensor, attention: torch.Tensor, cls_only: bool) -> torch.Tensor:
    """The rows of real tokens (or the first token of each row) as tokens x features."""
    if cls_only:
        return tensor[:, 0]
    return tensor[attention.bool()]


def _capture(model: nn.Module, masked: Masked, batch: dict, layer: int,
             heads: torch.Tensor, neurons: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass of ``batch`` up to ``layer``'s FFN with these masks; what the hooks
    captured there."""
    masked.heads, masked.neurons = heads, neurons
    masked.capture, masked.stop, masked.captured = layer, True, {}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        masked.capture, masked.stop = None, False
    return masked.captured


def _solve(ata: torch.Tensor, atb: torch.Tensor) -> torch.Tensor | None:
    """The least-squares minimiser from the normal equations ``A'A x = A'b`` (SVD-based,
    so a singular system gets its minimum-norm solution); None when it is not finite.

    The reference solves the same equations by LSMR with a damping of 1 for the change
    from the all-ones mask and at most ``n`` iterations (``utils/linalg.py``): the damping
    is absolute (negligible beside BERT-size sums, dominant in small systems) and the
    iteration limit stops ill-conditioned solves (the bias column's diagonal is tokens x
    hidden); the exact minimiser of a system this small costs milliseconds."""
    solution = torch.linalg.lstsq(ata.double().cpu(), atb.double().cpu().unsqueeze(1),
                                  driver="gelsd")
    values = solution.solution.squeeze(1).float().to(ata.device)
    return values if torch.isfinite(values).all() else None


def _error(norm: float, ata: torch.Tensor, atb: torch.Tensor, x: torch.Tensor) -> float:
    """|Ax - b|^2 from the normal equations: |b|^2 - 2 x.A'b + x.A'Ax."""
    x = x.to(ata)
    return max(norm - 2 * float(x @ atb) + float(x @ ata @ x), 0.0)


@torch.no_grad()
def tune_layer(model: nn.Module, masked: Masked, batches: list[dict], layer: int,
               teacher: tuple[torch.Tensor, torch.Tensor],
               student: tuple[torch.Tensor, torch.Tensor], cls_only: bool
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], bool]:
    """Least-squares masks of one layer's kept heads and neurons against the teacher
    masks' sublayer outputs (before their LayerNorm), on every batch: the new student
    masks, the squared reconstruction errors before and after, and whether both sublayers
    were tuned: a solve that fails or a mask beyond ±:data:`MAX_SCALE` leaves that
    sublayer (and the FFN after a failed attention) as it was, and the tuning stops there
    (as the reference's ``break`` does, which keeps the attention tuned before a failed
    FFN).

    Attention: each kept head's share of the output, ``context_h @ W_h``, is a column of A,
    with a column of ones (a free bias, dropped afterwards, as the reference does); the
    first layer's attention is not tuned (nor is it in the reference). FFN: neuron i's
    share is ``h_i w_i``, so A'A is ``(W W') * (H H')`` and A'b is ``sum_t h_it (w_i . b_t)``;
    the last layer of a classifier reconstructs its first token only.
    """
    heads, neurons = student[0].clone(), student[1].clone()
    module = encoder_layers(model)[layer]
    attention_dense = role_module(model, module, "output")
    ffn_dense = role_module(model, module, "ffn_out")
    device, size = attention_dense.weight.device, masked.size
    errors = dict.fromkeys(("attention_before", "attention_after", "ffn_before", "ffn_after"),
                           0.0)
    goals = []  # per batch: the teacher's attention and FFN outputs (pre-LayerNorm)
    for batch in batches:
        target = _capture(model, masked, batch, layer, *teacher)
        mask = batch["attention_mask"]
        context = target["context"] * teacher[0][layer].repeat_interleave(size)
        goals.append((_tokens(attention_dense(context) + target["attention_residual"], mask,
                              False),
                      _tokens(ffn_dense(target["ffn_masked"]) + target["ffn_residual"], mask,
                              cls_only)))
    kept = heads[layer].nonzero().flatten()
    if layer != 0 and len(kept):
        count = len(kept)
        weight = attention_dense.weight.t().reshape(heads.shape[1], size, -1)[kept]
        ata = torch.zeros(count + 1, count + 1, device=device)
        atb = torch.zeros(count + 1, device=device)
        norm = 0.0
        for batch, (goal, _) in zip(batches, goals, strict=True):
            mask = batch["attention_mask"]
            mine = _capture(model, masked, batch, layer, heads, neurons)
            context = _tokens(mine["context"], mask, False)
            residual = _tokens(mine["attention_residual"], mask, False)
            per_head = context.view(len(context), -1, size)[:, kept]  # tokens x k x size
            outputs = torch.einsum("tks,ksd->ktd", per_head, weight).reshape(count, -1)
            a = torch.cat([outputs.t(), torch.ones(outputs.shape[1], 1, device=device)], dim=1)
            b = (goal - attention_dense.bias - residual).flatten()
            ata += a.t() @ a
            atb += a.t() @ b
            norm += float(b @ b)
        scale = _solve(ata, atb)
        if scale is None or scale[:-1].abs().max() > MAX_SCALE:
            return heads, neurons, errors, False
        current = torch.cat([heads[layer][kept], torch.zeros(1, device=device)])
        errors["attention_before"] = _error(norm, ata, atb, current)
        applied = torch.cat([scale[:-1], torch.zeros(1, device=scale.device)])
        errors["attention_after"] = _error(norm, ata, atb, applied)  # without the bias
        heads[layer][kept] = heads[layer][kept] * scale[:-1].to(heads)
    kept = neurons[layer].nonzero().flatten()
    if len(kept):
        weight = ffn_dense.weight.t()[kept]  # k x hidden
        gram = weight @ weight.t()
        ata = torch.zeros(len(kept), len(kept), device=device)
        atb = torch.zeros(len(kept), device=device)
        norm = 0.0
        for batch, (_, goal) in zip(batches, goals, strict=True):
            mask = batch["attention_mask"]
            mine = _capture(model, masked, batch, layer, heads, neurons)
            hidden = _tokens(mine["activation"], mask, cls_only)[:, kept].t()  # k x tokens
            residual = _tokens(mine["ffn_residual"], mask, cls_only)
            b = goal - ffn_dense.bias - residual  # tokens x hidden
            ata += gram * (hidden @ hidden.t())
            atb += (hidden * (weight @ b.t())).sum(dim=1)
            norm += float((b * b).sum())
        scale = _solve(ata, atb)
        if scale is None or scale.abs().max() > MAX_SCALE:
            return heads, neurons, errors, False
        errors["ffn_before"] = _error(norm, ata, atb, neurons[layer][kept])
        errors["ffn_after"] = _error(norm, ata, atb, scale)
        neurons[layer][kept] = neurons[layer][kept] * scale.to(neurons)
    return heads, neurons, errors, True


# ------------------------------------------------------------------ the method


def fold(model: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    """Multiply each head's and neuron's input columns of the attention-output and
    FFN-output matrices by its mask: the unmasked model then computes the masked one."""
    size = head_size(model)
    with torch.no_grad():
        for index, layer in enumerate(encoder_layers(model)):
            attention = role_module(model, layer, "output")
            attention.weight.mul_(heads[index].repeat_interleave(size).to(attention.weight))
            ffn = role_module(model, layer, "ffn_out")
            ffn.weight.mul_(neurons[index].to(ffn.weight))


def plan_of(model: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> Plan:
    """The plan that slices away every masked head and neuron (original layer indices; the
    layers removed before are kept in it)."""
    removed = tuple(removed_layers(model))
    total = len(kept_layers(model)) + len(removed)
    kept_heads, kept_neurons = {}, {}
    for index, original in enumerate(kept_layers(model)):
        if not bool((heads[index] != 0).all()):
            kept_heads[original] = tuple(heads[index].nonzero().flatten().tolist())
        if not bool((neurons[index] != 0).all()):
            kept_neurons[original] = tuple(neurons[index].nonzero().flatten().tolist())
    return Plan(total, removed, kept_heads, kept_neurons)


def sample(dataset, count: int, seed: int):
    """``count`` rows of ``dataset`` drawn without replacement (all of them when fewer)."""
    rng = np.random.default_rng(seed)
    if count >= len(dataset):
        return dataset
    return dataset.select(sorted(rng.choice(len(dataset), size=count, replace=False).tolist()))


def run(context: Context, params: PostTrainingParams) -> Outcome:
    """Post-training pruning of ``context.model`` in place (see the package docstring)."""
    model = context.model
    started = time.perf_counter()
    check(model, params)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    device = next(model.parameters()).device
    rows = sample(context.train, params.samples, context.seed)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    batches = list(_batches(rows, context.config.batch_size, pad_id, device))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    seq = tokens / len(rows)
    count, heads_per_layer, size, hidden, _ = _shape(model)
    head_mac, neuron_mac = mac_per_head(seq, hidden, size), mac_per_neuron(seq, hidden)
    masked = Masked(model)
    phases = []
    on_step, close = context.progress(f"post-training constraint {params.constraint:g}")
    try:
        on_step(0, count + 1)
        start = time.perf_counter()
        head_grads, neuron_grads = mask_gradients(model, masked, batches)
        head_fisher = head_grads.pow(2).sum(0).cpu()  # the diagonal Fisher information
        neuron_fisher = neuron_grads.pow(2).sum(0).cpu()
        teacher = search(head_fisher, neuron_fisher, math.sqrt(params.constraint), head_mac,
                         neuron_mac)
        heads, neurons = search(head_fisher, neuron_fisher, params.constraint, head_mac,
                                neuron_mac)
        searched = (heads.clone(), neurons.clone())
        if params.rearrange:
            for layer in range(count):
                heads[layer] = rearrange(heads[layer], head_grads[:, layer].cpu())
                neurons[layer] = rearrange(neurons[layer], neuron_grads[:, layer].cpu())
        phases.append({"phase": "mask search", "steps": len(batches),
                       "seconds": round(time.perf_counter() - start, 3), "final_loss": 0.0,
                       "diverged": False})
        on_step(1, count + 1)
        details: dict[str, float | int | str] = {}
        if params.rescale:
            start = time.perf_counter()
            teacher = (teacher[0].to(device), teacher[1].to(device))
            student = (heads.to(device), neurons.to(device))
            before = after = 0.0
            tuned = 0
            for layer in range(count):
                # A sequence classifier (or regressor) reads the last layer's first token.
                heads_new, neurons_new, errors, finished = tune_layer(
                    model, masked, batches, layer, teacher, student,
                    cls_only=layer == count - 1)
                on_step(layer + 2, count + 1)
                student = (heads_new, neurons_new)
                before += errors["attention_before"] + errors["ffn_before"]
                after += errors["attention_after"] + errors["ffn_after"]
                if not finished:
                    break
                tuned += 1
            heads, neurons = student[0].cpu(), student[1].cpu()
            details |= {"layers_tuned": tuned, "reconstruction_error_before": round(before, 4),
                        "reconstruction_error_after": round(after, 4)}
            phases.append({"phase": "mask tuning", "steps": tuned,
                           "seconds": round(time.perf_counter() - start, 3),
                           "final_loss": round(after, 6), "diverged": False})
    finally:
        masked.remove()
        close()
    fold(model, heads, neurons)
    plan = plan_of(model, heads, neurons)
    apply_plan(model, plan)
    details |= {"mac_kept": round(mac_fraction(heads, neurons, seq, hidden, size), 4),
                "heads_kept": int((heads != 0).sum()), "neurons_kept": int((neurons != 0).sum()),
                "rearranged_heads": int((heads.ne(0) != searched[0].ne(0)).sum()) // 2,
                "sequence_length": round(seq, 2), "samples": len(rows),
                "seconds": round(time.perf_counter() - started, 3)}
    return Outcome(model, plan, phases, False, details)
