"""Channel importance: which neurons, channels and heads "do not affect the output".

Every criterion maps a torch-pruning group to one score per channel of the group's root
layer (a 1-D tensor, length = the root's output channels); the lowest scores are removed.

- ``l1`` / ``l2``: the norm of every weight that belongs to the channel across the whole
  group (the producing layer's filter, its BatchNorm scale, the consuming layer's input
  column), averaged over the group (torch-pruning's group magnitude). Needs no data.
- ``taylor``: first-order Taylor estimate of the loss change when the channel is removed,
  ``(sum of w * dL/dw over the channel's weights)^2`` per batch, summed over the given
  batches (Molchanov et al., CVPR 2019). edgeslim's ``TaylorImportance`` below:
  torch-pruning's sums the gradients over all batches first, and for a trained model
  those nearly cancel, leaving noise.
- ``activation``: the mean absolute activation that the channel feeds into the next
  Linear/conv layers, averaged over every example of the given batches (edgeslim's
  ``ActivationImportance`` below: torch-pruning's keeps only the last batch and mis-sizes
  groups whose first consumer is a flattened Linear). A channel
  that is ~0 on real data does not affect the output whatever its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from edgeslim.compress._batch import (
    call_model,
    describe,
    has_labels,
    primary_output,
    split_batch,
)
from edgeslim.errors import ConfigError, EdgeslimError, ModelError
from edgeslim.progress import progress_bar

__all__ = [
    "DATA_DRIVEN",
    "IMPORTANCES",
    "ActivationImportance",
    "TaylorImportance",
    "collect_statistics",
    "make_importance",
]

IMPORTANCES = ("l1", "l2", "taylor", "activation")
DATA_DRIVEN = frozenset({"taylor", "activation"})

# loss(model, inputs, labels or None) -> scalar tensor; used by the Taylor criterion
LossFn = Callable[[nn.Module, Any, "torch.Tensor | None"], torch.Tensor]


_OUT = frozenset({
    function.prune_conv_out_channels,
    function.prune_linear_out_channels,
    function.prune_depthwise_conv_out_channels,
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
    function.prune_groupnorm_out_channels,
    function.prune_instancenorm_out_channels,
})
_IN = frozenset({function.prune_conv_in_channels, function.prune_linear_in_channels})
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class _RootReduced(tp.importance.Importance):
    """Scores gathered per layer, mapped onto the group's root channels and averaged.

    Subclasses yield ``(layer scores for idxs, root idxs)`` pieces; each root channel gets
    the mean of the pieces that map to it, then the group is divided by its mean (so groups
    compare in global ranking). A group with no piece falls back to group L2 magnitude.
    """

    def __init__(self) -> None:
        self._fallback = tp.importance.GroupMagnitudeImportance(p=2)

    def _pieces(self, dep: Any, idxs: list[int]) -> torch.Tensor | None:
        raise NotImplementedError(f"{type(self).__name__} must define _pieces")

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        n = len(group[0].idxs)
        total, hits = torch.zeros(n), torch.zeros(n)
        for i, (dep, idxs) in enumerate(group):
            scores = self._pieces(dep, list(idxs))
            roots = group[i].root_idxs
            if scores is None or roots is None or any(r is None for r in roots):
                continue
            where = torch.as_tensor(list(roots), dtype=torch.long)
            total.scatter_add_(0, where, scores.float().cpu())
            hits.scatter_add_(0, where, torch.ones(len(where)))
        if not bool((hits > 0).any()):
            return self._fallback(group)
        imp = total / hits.clamp(min=1)
        return imp / imp.mean().clamp(min=1e-12)


class ActivationImportance(_RootReduced):
    """Mean |activation| entering each channel's consumers, accumulated over all batches.

    Inside ``recording(model)`` forward hooks on every Linear/conv layer add up ``|input|``
    per input channel (all positions and examples). ``__call__(group)`` returns one score per
    channel of the group's root, a tensor of shape ``(root channels,)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sum: dict[nn.Module, torch.Tensor] = {}
        self._count: dict[nn.Module, int] = {}

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[None]:
        self._sum.clear()
        self._count.clear()

        @torch.no_grad()
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            x = x.detach().abs().float()
            if isinstance(module, nn.Linear):
                per = x.reshape(-1, x.shape[-1])
            else:  # conv: channels on dim 1
                per = x.transpose(0, 1).reshape(x.shape[1], -1).T
            total = per.sum(0)
            if module in self._sum and self._sum[module].shape == total.shape:
                self._sum[module] += total
                self._count[module] += per.shape[0]
            else:
                self._sum[module] = total
                self._count[module] = per.shape[0]

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _WEIGHTED)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _pieces(self, dep: Any, idxs: list[int]) -> torch.Tensor | None:
        layer = dep.target.module
        if dep.handler not in _IN or layer not in self._sum:
            return None
        mean = self._sum[layer] / max(1, self._count[layer])
        return mean[torch.as_tensor(idxs, dtype=torch.long)]


class TaylorImportance(_RootReduced):
    """First-order Taylor importance, ``(sum over a channel's weights of w * dL/dw)^2``
    summed over batches (Molchanov et al., CVPR 2019, the squared group contribution).

    ``accumulate(model)`` runs after each batch's backward pass and adds, per layer, the
    squared contribution of every output channel (filter weights and bias), of every input
    channel (weight column) and of every norm channel (scale and shift).
    """

    def __init__(self) -> None:
        super().__init__()
        self._out: dict[nn.Module, torch.Tensor] = {}
        self._in: dict[nn.Module, torch.Tensor] = {}

    def reset(self) -> None:
        self._out.clear()
        self._in.clear()

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, _WEIGHTED) and m.weight.grad is not None:
                wg = m.weight * m.weight.grad
                if getattr(m, "transposed", False):
                    wg = wg.transpose(0, 1)
                out = wg.flatten(1).sum(1)
                if m.bias is not None and m.bias.grad is not None:
                    out = out + m.bias * m.bias.grad
                self._add(self._out, m, out.pow(2))
                self._add(self._in, m, wg.transpose(0, 1).flatten(1).sum(1).pow(2))
            elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
                if m.weight.grad is None:
                    continue
                c = (m.weight * m.weight.grad).flatten()
                if m.bias is not None and m.bias.grad is not None:
                    c = c + (m.bias * m.bias.grad).flatten()
                self._add(self._out, m, c.pow(2))

    @staticmethod
    def _add(store: dict[nn.Module, torch.Tensor], m: nn.Module, value: torch.Tensor) -> None:
        value = value.detach().float()
        if m in store and store[m].shape == value.shape:
            store[m] += value
        else:
            store[m] = value.clone()

    def _pieces(self, dep: Any, idxs: list[int]) -> torch.Tensor | None:
        layer = dep.target.module
        where = torch.as_tensor(idxs, dtype=torch.long)
        if dep.handler in _OUT and layer in self._out:
            return self._out[layer][where]
        if dep.handler in _IN and layer in self._in:
            scores = self._in[layer]
            groups = getattr(layer, "groups", 1)
            if groups > 1 and groups != layer.in_channels:  # grouped conv: per-group columns
                scores = scores.repeat(groups)
            return scores[where]
        return None


def make_importance(name: str) -> tp.importance.Importance:
    """The torch-pruning importance object for ``name`` (one of ``IMPORTANCES``)."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return TaylorImportance()
    return ActivationImportance()


def _cross_entropy(model: nn.Module, x: Any, y: torch.Tensor | None) -> torch.Tensor:
    if not has_labels(y):
        raise ConfigError(
            "importance='taylor' scores channels by the gradient of a loss, which needs "
            "labelled batches (x, y) in 'data' (or pass loss_fn(model, x, y) for another loss)."
        )
    return nn.functional.cross_entropy(primary_output(call_model(model, x)), y)


def collect_statistics(
    model: nn.Module,
    importance: tp.importance.Importance,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> int:
    """Feed ``data`` through ``model`` (eval mode) so a data-driven criterion can score it.

    Taylor: per-batch gradient contributions are accumulated (``.grad`` is cleared after).
    Activation: input statistics are recorded.
    Returns the number of batches seen. The model's weights and BatchNorm statistics are not
    changed.
    """
    was_training = model.training
    model.eval()
    seen = 0
    try:
        if isinstance(importance, ActivationImportance):
            with importance.recording(model), torch.no_grad(), progress_bar(
                "scoring channels", total=_len(data), enabled=progress
            ) as advance:
                for batch in data:
                    x, _ = split_batch(batch)
                    with _explained(x):
                        call_model(model, x)
                    seen += 1
                    advance(1)
        else:
            if not isinstance(importance, TaylorImportance):
                raise TypeError(f"no statistics to collect for {type(importance).__name__}")
            loss_fn = loss_fn or _cross_entropy
            importance.reset()
            with progress_bar("scoring channels", total=_len(data), enabled=progress) as advance:
                for batch in data:
                    x, y = split_batch(batch)
                    model.zero_grad(set_to_none=True)
                    with _explained(x):
                        loss = loss_fn(model, x, y)
                    loss.backward()
                    importance.accumulate(model)
                    seen += 1
                    advance(1)
            model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("The 'data' given to prune_structured yielded no batches.")
    return seen


@contextlib.contextmanager
def _explained(x: Any) -> Iterator[None]:
    try:
        yield
    except EdgeslimError:
        raise
    except Exception as exc:  # the user's forward on the user's data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"prune_structured could not run the model on a batch of 'data' with inputs of "
            f"shape {describe(x)}: {first}. A batch is (inputs, labels), bare inputs, or a "
            "dict of keyword inputs; several positional inputs go in a tuple: ((a, b), labels)."
        ) from None


def _len(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
