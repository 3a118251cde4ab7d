"""Knowledge distillation: train a small student to answer like a large teacher.

The loss, per batch, is ``alpha * soft + (1 - alpha) * hard`` where ``hard`` is the
cross-entropy of the student's logits against the labels and ``soft`` sums the selected
terms:

- ``"mse"``: the seed's mean squared error between student and teacher outputs;
- ``"kl"``: Hinton et al. (2015), ``T^2 * KL(softmax(t / T) || softmax(s / T))`` over the
  last dimension; the ``T^2`` keeps its gradients on the scale of the hard loss;
- ``"feature"``: the mean squared error between intermediate feature maps, one term per
  ``(student_layer, teacher_layer)`` pair in ``features``, averaged; where the widths differ
  a learned projection (a 1x1 convolution for ``(B, C, H, W)`` maps, a Linear on the last
  dimension otherwise) maps the student's feature onto the teacher's (FitNets, Romero et
  al. 2015). The projections are trained with the student and then dropped.

Terms combine with ``+``: ``loss="kl+feature"``. The teacher runs in eval mode without
gradients; the student trains with ``edgeslim.compress.train.fit`` (Adam, cosine decay).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim._validate import check_fraction, check_int_range, check_positive
from edgeslim.compress._batch import Batches, call_model, describe, has_labels, primary_output
from edgeslim.compress.train import fit, zero_keeper
from edgeslim.errors import ConfigError, EdgeslimError, ModelError

__all__ = ["LOSSES", "distill", "kl_loss"]

LOSSES = ("kl", "mse", "feature")
_FUNC = "distill"


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over all rows
    (every dimension but the last is a row)."""
    t = temperature
    s = student.reshape(-1, student.shape[-1])
    q = teacher.reshape(-1, teacher.shape[-1]).detach()
    return F.kl_div(
        F.log_softmax(s / t, dim=-1), F.log_softmax(q / t, dim=-1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Iterable[Any],
    *,
    loss: str | Sequence[str] = "kl",
    temperature: float = 4.0,
    alpha: float = 0.9,
    epochs: int = 10,
    lr: float = 1e-3,
    features: Sequence[tuple[str, str]] | None = None,
    weight_decay: float = 0.0,
    keep_zeros: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Train ``student`` (in place) to imitate ``teacher`` on ``train_data``; returns it in
    eval mode.

    Args:
        student, teacher: ``nn.Module``s whose outputs have the same shape (checked on the
            first batch before any training). The teacher is not changed.
        train_data: re-iterable batches ``(x, y)`` (``y``: class indices, shape ``(B,)``),
            or bare ``x`` for label-free distillation with ``alpha=1``.
        loss: ``"kl"``, ``"mse"``, ``"feature"`` or a combination such as ``"kl+feature"``.
        temperature: softmax temperature ``T > 0`` of the ``"kl"`` term.
        alpha: weight in [0, 1] of the soft (teacher) loss; ``1 - alpha`` weighs the hard
            label loss.
        epochs, lr, weight_decay: the training budget (Adam with cosine decay).
        features: ``(student_layer, teacher_layer)`` pairs of module names for ``"feature"``.
        keep_zeros: a pruned student keeps its sparsity: the weights ``prune`` zeroed stay
            zero (its masks), and in layers without a mask, weights exactly zero do, unless
            the tensor is zero throughout (a zero-initialised head trains);
            ``train.held_zeros``.
        progress: show a progress bar.

    Raises:
        ModelError: a model is not an ``nn.Module``, cannot run the data, or the outputs or
            paired features of student and teacher do not fit (both shapes named).
        ConfigError: a parameter is out of range, a layer name is unknown, or labels are
            needed and missing.
    """
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"The '{role}' of {_FUNC} must be a torch.nn.Module. "
                f"Got {type(model).__name__} instead."
            )
    if student is teacher:
        raise ModelError(f"The student and the teacher of {_FUNC} are the same module; "
                         "distill into a separate student (e.g. copy.deepcopy(teacher)).")
    if not isinstance(train_data, Iterable):  # not iter(): a DataLoader's iterator draws a seed
        raise ConfigError(f"The 'train_data' of {_FUNC} must be an iterable of (x, y) batches "
                          f"(or bare x with alpha=1). Got {type(train_data).__name__} "
                          "instead.")
    terms = _parse_loss(loss)
    temperature = check_positive(temperature, "temperature", _FUNC)
    alpha = check_fraction(alpha, "alpha", _FUNC, closed_right=True)
    epochs = check_int_range(epochs, "epochs", _FUNC, 1, 1_000_000)
    lr = check_positive(lr, "lr", _FUNC)
    weight_decay = check_positive(weight_decay, "weight_decay", _FUNC, allow_zero=True)
    pairs = _check_features(features, terms, student, teacher)

    data = Batches(train_data)
    first = data.first()
    if first is None:
        raise ConfigError(f"The 'train_data' of {_FUNC} yielded no batches.")
    x0, y0 = first
    if alpha < 1 and not has_labels(y0):
        raise ConfigError(
            f"alpha={alpha} gives the hard-label loss a weight of {1 - alpha:g}, but "
            "train_data yields no labels. Pass batches (x, y), or alpha=1.0 to learn from "
            "the teacher alone."
        )

    teacher_flags = (teacher.training, [p.requires_grad for p in teacher.parameters()])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        with _Features(student, teacher, pairs) as feats:
            s_out, t_out = _first_pass(student, teacher, x0)
            if s_out.shape != t_out.shape:
                raise ModelError(
                    f"The student's output shape {tuple(s_out.shape)} does not match the "
                    f"teacher's {tuple(t_out.shape)} on inputs of shape {describe(x0)}; "
                    "a student must answer in the teacher's shape."
                )
            if alpha < 1 and s_out.dim() != 2:
                raise ConfigError(
                    f"The hard-label loss needs class logits of shape (batch, classes); the "
                    f"models answer {tuple(s_out.shape)}. Pass alpha=1.0."
                )
            projections = feats.build_projections()

            def loss_fn(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    t = primary_output(call_model(teacher, x))
                s = primary_output(call_model(model, x))
                soft = s.new_zeros(())
                if "kl" in terms:
                    soft = soft + kl_loss(s, t, temperature)
                if "mse" in terms:
                    soft = soft + F.mse_loss(s, t)
                if "feature" in terms:
                    soft = soft + feats.loss(projections)
                total = alpha * soft
                if alpha < 1 and has_labels(y):
                    total = total + (1 - alpha) * F.cross_entropy(s, y)
                return total

            fit(
                student,
                data,
                epochs=epochs,
                lr=lr,
                loss_fn=loss_fn,
                params=[*student.parameters(), *projections.parameters()],
                weight_decay=weight_decay,
                after_step=zero_keeper(student) if keep_zeros else None,
                desc="distilling",
                progress=progress,
            )
    finally:
        teacher.train(teacher_flags[0])
        for p, flag in zip(teacher.parameters(), teacher_flags[1], strict=True):
            p.requires_grad_(flag)
    return student.eval()


def _parse_loss(loss: Any) -> frozenset[str]:
    parts = loss.split("+") if isinstance(loss, str) else loss
    if isinstance(parts, (list, tuple)) and parts and all(isinstance(p, str) for p in parts):
        terms = frozenset(p.strip() for p in parts)
        if terms <= set(LOSSES):
            return terms
    raise ConfigError(
        f"The 'loss' parameter of {_FUNC} must be one of 'kl', 'mse', 'feature' or a "
        f"combination joined by '+' (e.g. 'kl+feature'). Got {loss!r} instead."
    )


def _check_features(
    features: Any, terms: frozenset[str], student: nn.Module, teacher: nn.Module
) -> list[tuple[str, str]]:
    if features is None or (isinstance(features, (list, tuple)) and not features):
        if "feature" in terms:
            raise ConfigError(
                f"loss='feature' needs features=[(student_layer, teacher_layer), ...] naming "
                f"the layers to match. Student layers: {_names(student)}."
            )
        return []
    if "feature" not in terms:
        raise ConfigError(
            f"features were given but the loss has no 'feature' term; pass "
            f"loss='{'+'.join(sorted(terms))}+feature'."
        )
    pairs = []
    for item in features:
        if not (isinstance(item, (list, tuple)) and len(item) == 2
                and all(isinstance(n, str) for n in item)):
            raise ConfigError(
                f"The 'features' parameter of {_FUNC} must hold (student_layer, teacher_layer) "
                f"name pairs. Got {item!r} instead."
            )
        for role, name, model in (("student", item[0], student), ("teacher", item[1], teacher)):
            if name not in dict(model.named_modules()) or not name:
                raise ConfigError(
                    f"The {role} has no layer named {name!r}. Its layers are: {_names(model)}."
                )
        pairs.append((item[0], item[1]))
    return pairs


def _names(model: nn.Module, limit: int = 40) -> str:
    names = [n for n, _ in model.named_modules() if n]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _first_pass(student: nn.Module, teacher: nn.Module, x: Any) -> tuple[torch.Tensor, ...]:
    outs = []
    for role, model in (("student", student), ("teacher", teacher)):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outs.append(primary_output(call_model(model, x)))
        except EdgeslimError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"The {role} could not run a batch of train_data with inputs of shape "
                f"{describe(x)}: {first}."
            ) from None
        finally:
            model.train(was_training)
    return tuple(outs)


class _Features:
    """Forward hooks capturing the paired feature maps, and the projections between them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]):
        self.pairs = pairs
        self._student = dict(student.named_modules())
        self._teacher = dict(teacher.named_modules())
        self._s: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> _Features:
        for s_name, t_name in self.pairs:
            s_mod, t_mod = self._student[s_name], self._teacher[t_name]
            self._hooks.append(s_mod.register_forward_hook(self._keep(self._s, s_name)))
            self._hooks.append(t_mod.register_forward_hook(self._keep(self._t, t_name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            store[name] = primary_output(output)

        return hook

    def build_projections(self) -> nn.ModuleList:
        """One projection per pair, from the shapes seen on the first batch."""
        projections = nn.ModuleList()
        for s_name, t_name in self.pairs:
            s, t = self._s[s_name], self._t[t_name]
            projections.append(_projection(s, t, s_name, t_name))
        return projections

    def loss(self, projections: nn.ModuleList) -> torch.Tensor:
        terms = [
            F.mse_loss(proj(self._s[s_name]), self._t[t_name].detach())
            for proj, (s_name, t_name) in zip(projections, self.pairs, strict=True)
        ]
        return torch.stack(terms).mean()


def _projection(s: torch.Tensor, t: torch.Tensor, s_name: str, t_name: str) -> nn.Module:
    if s.shape == t.shape:
        return nn.Identity()
    if s.dim() == t.dim() == 4 and s.shape[0] == t.shape[0] and s.shape[2:] == t.shape[2:]:
        return nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1, bias=False)
    if s.dim() == t.dim() >= 2 and s.shape[:-1] == t.shape[:-1]:
        return nn.Linear(s.shape[-1], t.shape[-1], bias=False)
    raise ModelError(
        f"The student feature {s_name!r} has shape {tuple(s.shape)} and the teacher feature "
        f"{t_name!r} has shape {tuple(t.shape)}; only the channel width may differ (dim 1 of "
        "(B, C, H, W) maps, the last dim otherwise)."
    )
