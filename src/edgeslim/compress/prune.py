"""Unstructured magnitude pruning: the seed's "weight clipping".

The seed keeps the pruned weights ``w~`` that minimise ``L = sum ||w - w~||^2`` under a
sparsity constraint. For a target number of zeros that minimiser is exactly "zero the
smallest-magnitude weights", and for a threshold it is the seed's
``np.where(np.abs(w) < threshold, 0, w)``; ``L`` is then the sum of the squares of the
removed weights. This module does both, per layer or globally across layers, once
(one-shot) or along the polynomial schedule of Zhu & Gupta (2017),

    s_t = s_f + (s_i - s_f) * (1 - t / n)**3,    t = 1..n,

with fine-tuning between steps (``edgeslim.compress.train.fit``; the masks are re-applied
after every optimiser step). The masks live only while fine-tuning: the returned model has
plain zeros in its weights and no hooks, parametrizations or extra state-dict entries.

Only the ``weight`` of ``nn.Linear`` and convolution layers is pruned; biases, norms and
embeddings are left alone. Unstructured zeros make a model compress well (the bundle is
deflated) but not run faster on dense kernels; ``prune_structured`` removes whole channels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeslim._validate import check_choice, check_fraction, check_int_range, check_positive
from edgeslim.compress.train import LossFn, fit
from edgeslim.errors import ConfigError, ModelError

__all__ = [
    "LayerSparsity",
    "PruneResult",
    "measure_sparsity",
    "polynomial_schedule",
    "prunable_layers",
    "prune",
]

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
#: the attribute where ``prune`` leaves its masks on the model (layer name -> zeros), for
#: the training that follows to hold exactly those (``train.held_zeros``)
PRUNED_MASKS = "edgeslim_pruned_masks"


@dataclass(frozen=True)
class LayerSparsity:
    """One pruned layer: weight count, nonzero count, sparsity in [0, 1] and its share of L."""

    params: int
    nonzero: int
    sparsity: float
    objective: float = 0.0


@dataclass
class PruneResult:
    """What ``prune`` did.

    ``objective`` is the seed's ``L = sum ||w - w~||^2`` summed over the pruned weight
    tensors, measured at pruning time (before any fine-tuning; summed over the steps of a
    gradual schedule). ``sparsity`` is the fraction of zeros over the pruned weight tensors
    after fine-tuning; ``params``/``nonzero_params`` count every parameter of the model.
    ``schedule`` lists the target sparsity of each pruning step (empty when pruning by
    threshold); ``threshold`` is the largest magnitude removed by the last global step.
    """

    model: nn.Module
    objective: float
    sparsity: float
    params: int
    nonzero_params: int
    layers: dict[str, LayerSparsity]
    schedule: tuple[float, ...] = ()
    threshold: float | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for a bundle manifest's ``compression`` entry)."""
        return {
            "step": "prune",
            "params": dict(self.config),
            "metrics": {
                "objective": self.objective,
                "sparsity": self.sparsity,
                "params": self.params,
                "nonzero_params": self.nonzero_params,
                "layers": {
                    name: {"params": s.params, "nonzero": s.nonzero, "sparsity": s.sparsity}
                    for name, s in self.layers.items()
                },
            },
        }


def polynomial_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's targets ``s_t = s_f + (s_i - s_f)(1 - t/n)^3`` for ``t = 1..steps``."""
    return [final + (initial - final) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]


def prunable_layers(
    model: nn.Module, ignored_layers: Iterable[str | nn.Module] | None = None
) -> dict[str, nn.Module]:
    """``{module name: module}`` for each Linear/conv layer not ignored; shared weights once.

    ``ignored_layers``: layer names or modules (one of them alone is taken as a list of one).
    """
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    try:
        ignored = list(ignored_layers or [])
    except TypeError:
        raise ConfigError(f"The 'ignored_layers' parameter must be a list of layer names or "
                          f"modules. Got {type(ignored_layers).__name__} instead.") from None
    odd = [n for n in ignored if not isinstance(n, (str, nn.Module))]
    if odd:
        raise ConfigError(f"The 'ignored_layers' parameter must hold layer names (str) or "
                          f"modules. Got {odd[0]!r} ({type(odd[0]).__name__}).")
    found = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
    names = {n for n in ignored if isinstance(n, str)}
    unknown = sorted(names - set(found))
    if unknown:
        shown = ", ".join(repr(n) for n in sorted(found)[:20])
        raise ConfigError(
            f"The 'ignored_layers' parameter names layers the model does not have: "
            f"{', '.join(repr(n) for n in unknown)}. Prunable layers are: {shown}."
        )
    ignored_ids = {id(m) for m in ignored if isinstance(m, nn.Module)}
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in found.items():
        if name in names or id(m) in ignored_ids or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        out[name] = m
    return out


def measure_sparsity(model: nn.Module) -> dict[str, LayerSparsity]:
    """Sparsity of every Linear/conv weight of ``model`` (no pruning done)."""
    out = {}
    for name, m in prunable_layers(model).items():
        n, nz = m.weight.numel(), int(torch.count_nonzero(m.weight))
        out[name] = LayerSparsity(n, nz, 1.0 - nz / n if n else 0.0)
    return out


def _keep_masks_by_count(
    weights: list[torch.Tensor], sparsity: float
) -> tuple[list[torch.Tensor], float | None]:
    """Keep-masks that zero the ``round(sparsity * n)`` smallest |w| over ``weights`` jointly."""
    mags = torch.cat([w.detach().abs().flatten() for w in weights])
    k = round(sparsity * mags.numel())
    keep = torch.ones(mags.numel(), dtype=torch.bool, device=mags.device)
    threshold = None
    if k > 0:
        order = torch.argsort(mags, stable=True)[:k]
        keep[order] = False
        threshold = float(mags[order[-1]])
    masks, start = [], 0
    for w in weights:
        masks.append(keep[start : start + w.numel()].view_as(w))
        start += w.numel()
    return masks, threshold


def _prune_step(
    layers: dict[str, nn.Module],
    *,
    sparsity: float | None,
    threshold: float | None,
    scope: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float], float | None]:
    """Compute keep-masks, apply them; return masks, each layer's L, and the global cut."""
    weights = {name: m.weight for name, m in layers.items()}
    cut = None
    if threshold is not None:
        masks = {name: w.detach().abs() >= threshold for name, w in weights.items()}
    elif scope == "global":
        mask_list, cut = _keep_masks_by_count(list(weights.values()), sparsity or 0.0)
        masks = dict(zip(weights, mask_list, strict=True))
    else:
        masks = {
            name: _keep_masks_by_count([w], sparsity or 0.0)[0][0] for name, w in weights.items()
        }
    objectives = {}
    with torch.no_grad():
        for name, w in weights.items():
            removed = w.detach().to(torch.float64).masked_fill(masks[name], 0.0)
            objectives[name] = float((removed * removed).sum())
            w.masked_fill_(~masks[name], 0.0)
    return masks, objectives, cut


def _check_model(model: Any, func: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{func} needs a torch nn.Module as its model. Got {type(model).__name__} instead. "
            "(edgeslim.zoo.load_model turns a zoo name or 'module:callable' into one.)"
        )
    return model


def prune(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: str = "global",
    schedule: str = "oneshot",
    train_data: Iterable[Any] | None = None,
    epochs: int = 0,
    lr: float = 1e-3,
    steps: int = 5,
    initial_sparsity: float = 0.0,
    loss_fn: LossFn | None = None,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Zero the smallest-magnitude weights of the Linear/conv layers of ``model``.

    Give exactly one of ``sparsity`` (fraction of weights to zero, in [0, 1)) or
    ``threshold`` (zero every weight with ``|w| < threshold``, the seed's rule).
    ``scope``: ``"global"`` ranks all pruned weights together, ``"layer"`` gives every layer
    the same sparsity. ``schedule``: ``"oneshot"`` prunes once then fine-tunes ``epochs``
    epochs; ``"gradual"`` prunes in ``steps`` steps along the Zhu & Gupta schedule from
    ``initial_sparsity`` to ``sparsity``, splitting ``epochs`` fine-tuning epochs between the
    steps. Fine-tuning uses ``train_data`` (``(x, y)`` batches), Adam at ``lr`` and
    ``loss_fn`` (cross-entropy by default). The model is copied unless ``inplace``; the
    pruned model comes back in eval mode, ready to evaluate or export.

    >>> from edgeslim.zoo.digits import DigitsMLP
    >>> res = prune(DigitsMLP(), sparsity=0.5, progress=False)
    >>> round(res.sparsity, 3)
    0.5
    """
    func = "prune"
    _check_model(model, func)
    if (sparsity is None) == (threshold is None):
        raise ConfigError(
            "prune needs exactly one of 'sparsity' (fraction of weights to zero) or "
            f"'threshold' (zero weights with |w| < threshold). Got sparsity={sparsity!r}, "
            f"threshold={threshold!r}."
        )
    if sparsity is not None:
        sparsity = check_fraction(sparsity, "sparsity", func)
    if threshold is not None:
        threshold = check_positive(threshold, "threshold", func, allow_zero=True)
    scope = check_choice(scope, "scope", func, ("global", "layer"))
    schedule = check_choice(schedule, "schedule", func, ("oneshot", "gradual"))
    epochs = check_int_range(epochs, "epochs", func, 0, 10_000)
    steps = check_int_range(steps, "steps", func, 1, 10_000)
    lr = check_positive(lr, "lr", func)
    initial_sparsity = check_fraction(initial_sparsity, "initial_sparsity", func)
    if schedule == "gradual" and sparsity is None:
        raise ConfigError(
            "The 'schedule' parameter of prune is 'gradual', which needs a target 'sparsity'; "
            f"got threshold={threshold!r} instead. Use schedule='oneshot' with a threshold."
        )
    if schedule == "gradual" and sparsity is not None and initial_sparsity > sparsity:
        raise ConfigError(
            f"The 'initial_sparsity' parameter of prune must be at most sparsity={sparsity}. "
            f"Got {initial_sparsity!r} instead."
        )
    if epochs > 0 and train_data is None:
        raise ConfigError(
            f"The 'train_data' parameter of prune must be an iterable of (x, y) batches when "
            f"epochs={epochs} > 0. Got None instead; pass train_data or set epochs=0."
        )
    names = list(prunable_layers(model, ignored_layers))  # resolved before any copy
    if not inplace:
        model = copy.deepcopy(model)
    layers = {name: model.get_submodule(name) for name in names}
    if not layers:
        raise ModelError(
            f"prune found no Linear or convolution layer to prune in {type(model).__name__} "
            "(after ignored_layers)."
        )

    if schedule == "gradual":
        targets = polynomial_schedule(sparsity or 0.0, steps, initial_sparsity)
    else:
        targets = [sparsity] if sparsity is not None else [None]
    objective = dict.fromkeys(layers, 0.0)
    cut = None
    for i, target in enumerate(targets):
        masks, step_objective, cut = _prune_step(
            layers, sparsity=target, threshold=threshold, scope=scope
        )
        for name, value in step_objective.items():
            objective[name] += value
        step_epochs = epochs * (i + 1) // len(targets) - epochs * i // len(targets)
        if step_epochs > 0 and train_data is not None:
            pairs = [(layers[name].weight, ~m) for name, m in masks.items()]

            def hold_masks(pairs: list[tuple[torch.Tensor, torch.Tensor]] = pairs) -> None:
                with torch.no_grad():
                    for w, dropped in pairs:
                        w.masked_fill_(dropped, 0.0)

            desc = "fine-tuning" if len(targets) == 1 else f"fine-tuning {i + 1}/{len(targets)}"
            fit(
                model,
                train_data,
                epochs=step_epochs,
                lr=lr,
                loss_fn=loss_fn,
                after_step=hold_masks,
                desc=desc,
                progress=progress,
            )
    model.eval()
    # the masks later training holds (train.held_zeros): a layer pruning emptied included
    setattr(model, PRUNED_MASKS, {name: m.weight.detach() == 0 for name, m in layers.items()})

    report = {}
    for name, m in layers.items():
        n, nz = m.weight.numel(), int(torch.count_nonzero(m.weight))
        report[name] = LayerSparsity(n, nz, 1.0 - nz / n, objective[name])
    pruned = sum(s.params for s in report.values())
    zeros = sum(s.params - s.nonzero for s in report.values())
    unique = {id(p): p for p in model.parameters()}.values()
    config = {
        "sparsity": sparsity,
        "threshold": threshold,
        "scope": scope,
        "schedule": schedule,
        "steps": len(targets),
        "epochs": epochs,
        "lr": lr,
    }
    return PruneResult(
        model=model,
        objective=math.fsum(objective.values()),
        sparsity=zeros / pruned,
        params=sum(p.numel() for p in unique),
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in unique),
        layers=report,
        schedule=tuple(t for t in targets if t is not None),
        threshold=cut,
        config=config,
    )
