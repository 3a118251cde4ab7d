"""Training and evaluation loops shared by every technique (fine-tuning, QAT, distillation).

One loop, with a progress bar, so each technique only supplies its loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from edgeslim.errors import ConfigError
from edgeslim.progress import progress_bar

__all__ = ["LossFn", "accuracy", "fit", "predict", "zero_keeper"]

# loss(model, inputs, labels) -> scalar tensor
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    x, y = batch[0], batch[1]
    return torch.as_tensor(x), torch.as_tensor(y)


def fit(
    model: nn.Module,
    data: Iterable[Any],
    *,
    epochs: int,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    params: Iterable[nn.Parameter] | None = None,
    weight_decay: float = 0.0,
    after_step: Callable[[], None] | None = None,
    before_epoch: Callable[[int], None] | None = None,
    desc: str = "fine-tuning",
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` on ``(x, y)`` batches with Adam and cosine decay; returns it in eval mode.

    ``after_step`` runs after every optimiser step (pruning uses it to hold masks);
    ``before_epoch(epoch)`` runs at the start of each epoch (gradual schedules use it).
    Data that is not an iterable of batches, yields none, or that the model cannot train on
    (shapes, dtypes, labels) raises ``ConfigError`` naming the batch and the reason.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"The 'loss_fn' of {desc} must be callable as loss_fn(model, x, y). "
                          f"Got {type(loss_fn).__name__} instead.")
    if not isinstance(data, Iterable):  # not iter(data): a DataLoader's iterator draws a seed
        raise ConfigError(f"The training data of {desc} must be an iterable of (inputs, labels) "
                          f"batches. Got {type(data).__name__} instead.")
    loss_fn = loss_fn or _cross_entropy
    opt = torch.optim.Adam(
        list(params) if params is not None else model.parameters(),
        lr=lr,
        weight_decay=weight_decay,
    )
    try:
        steps_per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = steps_per_epoch * epochs if steps_per_epoch else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    model.train()
    steps = 0
    with progress_bar(desc, total=total, enabled=progress) as advance:
        for epoch in range(epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            for i, batch in enumerate(data):
                try:
                    x, y = _split(batch)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model, x, y)
                    loss.backward()
                except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:
                    raise _bad_batch(desc, i, batch, exc) from exc
                opt.step()
                steps += 1
                if after_step is not None:
                    after_step()
                advance(1, loss=float(loss.detach()))
            if steps == 0:
                raise ConfigError(f"The training data of {desc} yielded no batches; "
                                  f"{epochs} epoch(s) would train nothing.")
            sched.step()
    return model.eval()


def _bad_batch(desc: str, index: int, batch: Any, exc: Exception) -> ConfigError:
    """Why training stopped on a batch, in one line: which batch, its shapes, the reason."""
    from edgeslim.compress._batch import describe

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"{desc} cannot train on batch {index} of shape {describe(batch)}: "
        f"{reason[:300].rstrip('.')}. "
        "Batches must be (inputs, labels) with inputs the model accepts and labels integer "
        "class indices in range (or give a loss_fn that takes them).")


def held_zeros(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """The Linear and convolution layers whose zero weights training must keep, with their
    masks: the masks ``prune`` left on the model, a layer it emptied included; for a layer
    without one (zeros made otherwise, or shapes changed since), its exactly-zero weights,
    unless the tensor is zero throughout (a zero-initialised classifier head must learn)."""
    from edgeslim.compress.prune import PRUNABLE, PRUNED_MASKS  # prune imports this module

    recorded = getattr(model, PRUNED_MASKS, None) or {}
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE):
            continue
        mask = recorded.get(name)
        if mask is not None and mask.shape == m.weight.shape:
            zero = mask & (m.weight.detach() == 0)  # what was pruned and is still zero
        else:
            zero = m.weight.detach() == 0
            if bool(zero.all()):
                continue
        if bool(zero.any()):
            found.append((m, zero))
    return found


def zero_keeper(model: nn.Module, held: list[tuple[nn.Module, torch.Tensor]] | None = None
                ) -> Callable[[], None] | None:
    """For ``fit(after_step=...)``: a function that sets back to zero the weights
    ``held_zeros`` names (the pruned ones; or those of ``held``, a part of its answer), so
    that training after pruning keeps the sparsity; None when there are none."""
    masks = [(m.weight, zero) for m, zero in (held_zeros(model) if held is None else held)]
    if not masks:
        return None

    @torch.no_grad()
    def keep() -> None:
        for w, zero in masks:
            w.masked_fill_(zero, 0.0)

    return keep


@torch.no_grad()
def predict(model: nn.Module, data: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over ``(x, y)`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for batch in data:
        x, y = _split(batch)
        outs.append(model(x))
        labels.append(y)
    model.train(was_training)
    return torch.cat(outs), torch.cat(labels)


def accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy in [0, 1] over ``(x, y)`` batches."""
    logits, labels = predict(model, data)
    return float((logits.argmax(1) == labels).float().mean())
