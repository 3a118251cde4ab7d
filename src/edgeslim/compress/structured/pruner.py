"""``prune_structured``: remove the neurons, channels and attention heads that do not affect
the output (the seed's "pruning"), for real: the returned model has fewer parameters and
fewer MACs, and runs faster on dense kernels.

Graph -> importance -> pruner, as in torch-pruning: ``graph`` traces the model into
torch-pruning's DepGraph and protects the layers that shape an output, ``importance`` scores
channels, and torch-pruning's ``MetaPruner`` removes the lowest-scored ones group by group
(every coupled layer shrinks together, so the model stays consistent). ``attention`` keeps
the head bookkeeping of attention modules right after heads are removed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch_pruning as tp
from torch import nn

from edgeslim._validate import check_choice, check_fraction, check_int_range
from edgeslim.compress._batch import describe, to_torch
from edgeslim.compress.structured.attention import find_attention, mha_heads
from edgeslim.compress.structured.graph import (
    ROOT_TYPES,
    build_graph,
    check_model,
    coupled_roots,
    forward,
    output_layers,
    resolve_layers,
    run_example,
    tied_layers,
    trainable,
)
from edgeslim.compress.structured.importance import (
    DATA_DRIVEN,
    IMPORTANCES,
    LossFn,
    collect_statistics,
    make_importance,
)
from edgeslim.compress.structured.report import (
    LayerWidth,
    StructuredReport,
    StructuredResult,
    count,
    layer_widths,
)
from edgeslim.errors import ConfigError, EdgeslimError, ModelError

__all__ = ["check_structured", "prune_structured"]

_FUNC = "prune_structured"

log = logging.getLogger("edgeslim.compress.structured")


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    importance: str = "l2",
    scope: str = "layer",
    head_ratio: float = 0.0,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    round_to: int | None = None,
    iterative_steps: int = 1,
    after_step: Callable[[nn.Module, int], None] | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> StructuredResult:
    """Remove a fraction ``ratio`` of the channels/neurons of every prunable layer group.

    Args:
        model: the trained ``nn.Module``. It is copied unless ``inplace`` (then an error
            half-way can leave it partly pruned).
        example_inputs: one input the model accepts (a tensor such as ``(1, 64)``, a tuple
            of positional inputs, or a dict of keyword inputs); used to trace the graph and
            to count MACs.
        ratio: fraction in [0, 1) of the channels removed from each group (``scope="layer"``)
            or from all groups together, ranked globally (``scope="global"``; every group
            keeps at least one channel, or ``round_to``). A grouped convolution (or a
            GroupNorm) loses the same channels in each of its groups, so its width stays a
            multiple of ``groups``: its channels are ranked and counted once per position in
            a group (a depthwise convolution is pruned with the layer that feeds it).
        importance: ``"l1"``/``"l2"`` (weight magnitude, no data), ``"taylor"`` (loss
            gradient x weight, needs labelled ``data`` or a ``loss_fn``) or ``"activation"``
            (mean |activation| on ``data``). See ``edgeslim.compress.structured.importance``.
        head_ratio: fraction in [0, 1) of the attention heads removed whole from each
            attention module (BERT-family self-attention; see ``structured.attention``):
            ``ceil(head_ratio * heads)`` of its original heads, also over ``iterative_steps``;
            a ratio that would remove every head is refused.
            Attention projections are never narrowed by ``ratio``: they lose whole heads only.
        ignored_layers: layers (modules or qualified names) kept whole. The layers whose
            pruning would change the width of a model output (the final classifier) are
            always kept whole, so the output shape never changes, and so are layers that
            share a parameter (an embedding tied to the output head), so the tie holds.
        data: batches ``(x, y)`` (or bare ``x`` for ``"activation"``) scored by the
            data-driven criteria; a few batches suffice. The model's weights are not trained.
        loss_fn: ``loss(model, x, y)`` for ``"taylor"``; default cross-entropy on the logits.
        round_to: keep each pruned width a multiple of this (e.g. 8 for SIMD-friendly
            shapes), and of ``groups`` for a grouped convolution. Models with
            ``nn.MultiheadAttention`` are rounded to a multiple of its head count.
        iterative_steps: reach ``ratio`` in this many equal steps, re-scoring in between;
            ``after_step(model, step)`` runs after each (e.g. to fine-tune).
        progress: show progress bars.

    Returns:
        ``StructuredResult(model, report)``; the model is in the training mode it came in.

    Raises:
        ModelError: ``model`` is not an ``nn.Module`` or cannot run ``example_inputs``.
        ConfigError: a parameter is out of range or a name is unknown.

    >>> import torch
    >>> from edgeslim.zoo.digits import DigitsCNN
    >>> result = prune_structured(DigitsCNN(), torch.zeros(1, 64), ratio=0.5, progress=False)
    >>> result.model.conv2.out_channels, result.model.fc2.out_features
    (32, 10)
    """
    result = _prune_structured(
        model, example_inputs, ratio=ratio, importance=importance, scope=scope,
        head_ratio=head_ratio, ignored_layers=ignored_layers, data=data, loss_fn=loss_fn,
        round_to=round_to, iterative_steps=iterative_steps, after_step=after_step,
        inplace=inplace, progress=progress, check_only=False)
    assert result is not None  # (None only when check_only)
    return result


def check_structured(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    scope: str = "layer",
    head_ratio: float = 0.0,
    ignored_layers: Iterable[str | nn.Module] | None = None,
    round_to: int | None = None,
) -> None:
    """Raise the ``ConfigError`` that ``prune_structured`` would raise for these settings
    (a ``ratio`` or ``round_to`` that would leave a layer group without a channel, too few
    heads...), without pruning: the model is traced on a copy and left as it was.

    For planners (``edgeslim.optimize``) that must not propose settings the pruner refuses;
    the arguments mean what they mean in ``prune_structured``, and the checks are its own.

    >>> import torch
    >>> from edgeslim.zoo.digits import DigitsCNN
    >>> try:
    ...     check_structured(DigitsCNN(), torch.zeros(1, 64), ratio=0.8, round_to=8)
    ... except ConfigError as exc:
    ...     print(str(exc).split(":")[0])
    ratio=0.8 would leave no channel in conv1 (32)
    """
    _prune_structured(model, example_inputs, ratio=ratio, importance="l2", scope=scope,
                      head_ratio=head_ratio, ignored_layers=ignored_layers, data=None,
                      loss_fn=None, round_to=round_to, iterative_steps=1, after_step=None,
                      inplace=False, progress=False, check_only=True)


def _prune_structured(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    importance: str,
    scope: str,
    head_ratio: float,
    ignored_layers: Iterable[str | nn.Module] | None,
    data: Iterable[Any] | None,
    loss_fn: LossFn | None,
    round_to: int | None,
    iterative_steps: int,
    after_step: Callable[[nn.Module, int], None] | None,
    inplace: bool,
    progress: bool,
    check_only: bool,
) -> StructuredResult | None:
    """``prune_structured``; with ``check_only``, stop (returning None) once every check
    has passed, before anything is pruned."""
    check_model(model, _FUNC)
    ratio = check_fraction(ratio, "ratio", _FUNC)
    head_ratio = check_fraction(head_ratio, "head_ratio", _FUNC)
    check_choice(importance, "importance", _FUNC, IMPORTANCES)
    check_choice(scope, "scope", _FUNC, {"layer", "global"})
    iterative_steps = check_int_range(iterative_steps, "iterative_steps", _FUNC, 1, 1000)
    if round_to is not None:
        round_to = check_int_range(round_to, "round_to", _FUNC, 1, 1 << 20)
    if importance in DATA_DRIVEN and data is None:
        raise ConfigError(
            f"importance={importance!r} scores channels on data: pass data=... (a few "
            "batches of (x, y)), or use importance='l1' or 'l2', which need none."
        )
    example_inputs = to_torch(example_inputs)
    shapes_before = run_example(model, example_inputs, _FUNC)

    work = model if inplace else copy.deepcopy(model)
    was_training = work.training
    ignored = resolve_layers(work, ignored_layers, "ignored_layers", _FUNC, original=model)
    attention = find_attention(work)
    if head_ratio > 0 and not attention:
        raise ModelError(
            f"head_ratio={head_ratio} asks to remove attention heads, but the model has no "
            "attention module whose heads can be removed (supported: BERT-family "
            "self-attention with query/key/value Linear layers; nn.MultiheadAttention keeps "
            "its heads). Pass head_ratio=0."
        )
    if head_ratio > 0:
        _check_heads_left(attention, head_ratio, scope)
    prune_ratio, only_heads = ratio, []
    if ratio == 0 and head_ratio > 0:
        # torch-pruning removes heads only while it narrows layers: narrow nothing else
        qkv = {id(p) for layer in attention for p in layer.projections}
        only_heads = [m for m in work.modules() if isinstance(m, ROOT_TYPES) and id(m) not in qkv]
        prune_ratio = head_ratio
    heads = mha_heads(work)
    if heads:
        round_to = math.lcm(round_to or 1, *heads)
    widths_before = layer_widths(work)
    if not widths_before:
        raise ModelError(f"{_FUNC} found no convolution, Linear, attention, embedding or LSTM "
                         f"layer in {type(model).__name__}: there is nothing to prune.")
    macs_before, params_before = count(work, example_inputs)
    scorer = make_importance(importance)
    # global ranking could put every channel of a group below the threshold, and
    # torch-pruning then skips that group whole: keep each group's best channels out of reach
    # (the scores are kept in both scopes, for rounding)
    ranked = _Floored(scorer, round_to or 1, floor=scope == "global")

    with trainable(work):
        try:
            with _explained(model, example_inputs):
                graph, outputs = build_graph(work, example_inputs)
                protected = output_layers(graph, outputs, ignored)
                protected += _keep_tied(work, graph, ignored + protected)
                num_heads = {p: layer.heads for layer in attention for p in layer.projections}
                pruner = tp.pruner.MetaPruner(
                    work,
                    example_inputs,
                    importance=ranked,
                    global_pruning=scope == "global",
                    pruning_ratio=prune_ratio,
                    iterative_steps=iterative_steps,
                    ignored_layers=ignored + protected + only_heads,
                    round_to=None,  # rounded by _rounded: torch-pruning's misses channel groups
                    num_heads=num_heads,
                    prune_num_heads=head_ratio > 0,
                    prune_head_dims=False,
                    head_pruning_ratio=head_ratio,
                    # fresh dicts: torch-pruning mutates these (its defaults are shared)
                    in_channel_groups={},
                    out_channel_groups={},
                    channel_groups={},
                    forward_fn=forward,
                    root_module_types=list(ROOT_TYPES),
                )
                budget = None
                groups = _ranked_groups(pruner, work)
                ranked.pruner = pruner
                if prune_ratio > 0 and not only_heads:
                    if scope == "layer":
                        _check_reachable(groups, prune_ratio, round_to)
                    else:
                        budget = _check_reachable_global(groups, prune_ratio, round_to)
            if check_only:
                return None
            heads_before = [layer.heads for layer in attention]
            for step in range(iterative_steps):
                if importance in DATA_DRIVEN:
                    collect_statistics(work, scorer, data, loss_fn=loss_fn, progress=progress)
                if head_ratio > 0 and scope == "layer":
                    _schedule_heads(pruner, attention, heads_before, head_ratio,
                                    (step + 1) / iterative_steps)
                with _explained(model, example_inputs):
                    for group in pruner.step(interactive=True):
                        _rounded(pruner, group, ranked.scores, round_to).prune()
                    for layer in attention:
                        layer.set_heads(num_heads[layer.projections[0]])
                work.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step(work, step)
        finally:
            work.train(was_training)
    if budget is not None:
        _check_removed(pruner, budget, prune_ratio)

    shapes_after = run_example(work, example_inputs, _FUNC, pruned=True)
    if shapes_after != shapes_before:  # cannot happen unless an output layer escaped the graph
        raise ModelError(
            f"{_FUNC} changed the output shapes from {shapes_before} to {shapes_after}; add the "
            "layers that produce the outputs to ignored_layers."
        )
    macs_after, params_after = count(work, example_inputs)
    widths_after = layer_widths(work)
    names = {id(m): n for n, m in work.named_modules()}
    report = StructuredReport(
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        layers=tuple(
            LayerWidth(name, unit, before, widths_after.get(name, (unit, before))[1])
            for name, (unit, before) in widths_before.items()
        ),
        ignored=tuple(sorted({names[id(m)] for m in ignored + protected if id(m) in names})),
        config={
            "ratio": ratio,
            "importance": importance,
            "scope": scope,
            "head_ratio": head_ratio,
            "round_to": round_to,
            "iterative_steps": iterative_steps,
        },
    )
    return StructuredResult(work, report)


def _check_reachable(groups: list[tuple[str, nn.Module, int, bool, int]], ratio: float,
                     round_to: int | None) -> None:
    """Refuse a ``ratio`` (or ``round_to``) that would leave a layer group with no channel.

    torch-pruning skips such a group without a word, so ``ratio=0.99`` would return a model
    with its first layers untouched (and bigger than at 0.95). Each group of ``scope="layer"``
    keeps ``int(ranked * (1 - ratio))`` of its ranked channels (``_ranked``), rounded down as
    ``_rounded`` does.
    """
    short = []
    for name, _, width, attention, groups_of in groups:
        ranked = _ranked(width, groups_of)
        if attention or ranked <= 1:  # attention loses whole heads only; one cannot go
            continue
        keep = int(ranked * (1 - ratio))
        keep -= keep % _unit(round_to, groups_of)
        if keep < 1:
            short.append((_label(name, width, groups_of), ranked))
    if short:
        most = "a smaller ratio"
        if not round_to:
            most = f"a ratio below {1 - 1 / min(ranked for _, ranked in short):.4g}"
        short = [label for label, _ in short]
        hint = (f"round_to={round_to} is more than they keep; use a smaller round_to or ratio"
                if round_to else f"use {most}")
        raise ConfigError(
            f"ratio={ratio:g} would leave no channel in {', '.join(short)}: {hint}, or add "
            f"them to ignored_layers.")


def _keep_tied(work: nn.Module, graph: Any, ignored: list[nn.Module]) -> list[nn.Module]:
    """Layers left whole because they hold a parameter shared with another layer.

    Pruning gives each layer its own narrower copy of the tensor: an Embedding tied to the
    output head came out untied, and the model grew. The tied layers and every group that
    would narrow them are kept whole.
    """
    tied = tied_layers(work)
    if not tied:
        return []
    modules = dict(work.named_modules())
    layers = [modules[n] for names in tied.values() for n in names]
    log.info("%s keeps whole the layers that share parameters: %s", _FUNC,
             "; ".join(f"{p} ({', '.join(n or '<model>' for n in names)})"
                       for p, names in tied.items()))
    return layers + coupled_roots(graph, layers, ignored + layers)


def _check_heads_left(attention: list[Any], head_ratio: float, scope: str) -> None:
    """Refuse a ``head_ratio`` that would remove every head of an attention layer (each layer
    loses ``ceil(head_ratio * heads)``; under ``scope="global"`` all keep
    ``int(total * (1 - head_ratio))`` together)."""
    if scope == "layer":
        empty = [f"{a.name} ({a.heads} heads)" for a in attention
                 if math.ceil(head_ratio * a.heads) >= a.heads]
        fewest = min(a.heads for a in attention)
    else:
        total = sum(a.heads for a in attention)
        empty = ([f"{a.name} ({a.heads} heads)" for a in attention]
                 if int(total * (1 - head_ratio)) < len(attention) else [])
        fewest = total / len(attention)
    if empty:
        most = math.floor((1 - 1 / fewest) * 1e4) / 1e4
        raise ConfigError(
            f"head_ratio={head_ratio:g} would leave no head in {', '.join(empty)}: use a "
            f"head_ratio of at most {most:g}.")


def _schedule_heads(pruner: Any, attention: list[Any], heads_before: list[int],
                    head_ratio: float, done: float) -> None:
    """Per-layer head ratios for the next step, so that a share ``done`` of the way there
    each layer has lost ``ceil(done * head_ratio * heads)`` of its original heads.

    torch-pruning removes ``ceil(step ratio * current heads)`` heads per step, its step
    ratio rising linearly towards ``head_ratio``: the ratio compounds on the heads left, and
    12 heads at ``head_ratio=0.5`` in 3 steps ended with 3 heads instead of 6.
    """
    steps = pruner.iterative_steps + 1
    for layer, before in zip(attention, heads_before, strict=True):
        goal = math.ceil(done * head_ratio * before - 1e-9)
        remove = goal - (before - layer.heads)
        # ceil((remove - 0.5) / heads * heads) == remove, whatever the float rounding
        share = (remove - 0.5) / layer.heads if remove > 0 else 0.0
        for projection in layer.projections:
            pruner.head_pruning_ratio_dict[projection] = [share] * steps


class _Floored(tp.importance.Importance):
    """``scorer``'s scores, kept per group root in ``scores`` (one per ranked channel, as
    torch-pruning ranks them) for ``_rounded``; with ``floor`` the best channels of every group
    are raised to +inf.

    Under ``scope="global"`` torch-pruning removes every channel scored at or below one
    threshold, and skips without a word a group that would lose them all: at ``ratio=0.8``
    digits-cnn kept conv2 at its full 64 channels (and came out bigger than at 0.5). With
    the floor each group keeps at least one ranked channel, or as many as ``round_to``
    needs (``_unit``), and the threshold moves up so that ``ratio`` of all ranked channels
    still goes. A grouped convolution's scores come as ``groups`` rows of positions, which
    torch-pruning ranks by their mean and removes from every row at once: the floor raises
    whole positions. Attention groups are left as scored: they lose whole heads, ranked on
    these scores.
    """

    def __init__(self, scorer: Any, round_to: int, *, floor: bool) -> None:
        self.scorer = scorer
        self.round_to = round_to
        self.floor = floor
        self.pruner: Any = None  # set once torch-pruning's pruner exists
        self.scores: dict[nn.Module, Any] = {}

    def __call__(self, group: Any) -> Any:
        imp = self.scorer(group)
        if imp is None or self.pruner is None or self.pruner._is_atten_group(group)[0]:
            return imp
        groups_of = int(self.pruner._get_channel_groups(group))
        per = imp.detach().clone().float().view(groups_of, -1)
        if self.floor:
            keep = min(_unit(self.round_to, groups_of), per.shape[1])
            per[:, per.mean(0).topk(keep).indices] = math.inf
        self.scores[group[0].dep.target.module] = per.mean(0)
        return per.view(-1) if self.floor else imp


def _ranked(width: int, groups_of: int) -> int:
    """How many channels torch-pruning ranks in a group ``width`` wide whose channels fall
    into ``groups_of`` channel groups (a grouped conv's ``groups``): one per position."""
    return width // groups_of


def _unit(round_to: int | None, groups_of: int) -> int:
    """The ranked channels kept come in multiples of this, so that the width (ranked x
    ``groups_of``) is a multiple of ``round_to``."""
    return (round_to or 1) // math.gcd(round_to or 1, groups_of)


def _label(name: str, width: int, groups_of: int) -> str:
    return f"{name} ({width})" if groups_of == 1 else f"{name} ({width} in {groups_of} groups)"


def _rounded(pruner: Any, group: Any, scores: dict[nn.Module, Any], round_to: int | None
             ) -> Any:
    """``group`` removing more channels, so that its root keeps a multiple of ``_unit``.

    torch-pruning's own ``round_to`` counts the positions removed from a grouped
    convolution against its full width: a conv 24 wide in 4 groups lost 16 channels where
    it should have lost 4, or all 24. Here the ranked channels kept are rounded down and the
    lowest-scored go, as torch-pruning does for ungrouped layers.
    """
    root, idxs = group[0].dep.target.module, group[0].idxs
    imp = scores.get(root)
    if not round_to or imp is None or not pruner.DG.is_out_channel_pruning_fn(
            group[0].dep.handler):
        return group
    ranked = len(imp)
    groups_of = pruner.DG.get_out_channels(root) // ranked
    keep = ranked - len({int(i) % ranked for i in idxs})
    rounded = keep - keep % _unit(round_to, groups_of)
    if rounded == keep or rounded < 1:  # (< 1: refused beforehand by the checks)
        return group
    drop = imp.argsort()[: ranked - rounded].tolist()
    return pruner.DG.get_pruning_group(
        root, group[0].dep.handler, sorted(p + g * ranked for g in range(groups_of) for p in drop))


def _ranked_groups(pruner: Any, work: nn.Module
                   ) -> list[tuple[str, nn.Module, int, bool, int]]:
    """``(name, root module, width, is attention, channel groups)`` of every group
    torch-pruning ranks."""
    names = {id(m): n for n, m in work.named_modules()}
    found = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        dep = group[0].dep
        if not pruner.DG.is_out_channel_pruning_fn(dep.handler):
            continue
        width = pruner.DG.get_out_channels(dep.target.module)
        if not width or width <= 1:
            continue
        found.append((names.get(id(dep.target.module), "?"), dep.target.module, width,
                      bool(pruner._is_atten_group(group)[0]),
                      int(pruner._get_channel_groups(group))))
    return found


def _check_reachable_global(groups: list[tuple[str, nn.Module, int, bool, int]], ratio: float,
                            round_to: int | None
                            ) -> tuple[list[tuple[nn.Module, int, int]], int]:
    """Refuse a global ``ratio`` that cannot keep ``round_to`` (else 1) channels in every
    group; returns the non-attention roots with their widths and channel groups, and the
    total ranked.

    All groups together keep ``int(total * (1 - ratio))`` ranked channels (``_ranked``: a
    grouped convolution's count once per position), each at least ``_unit`` of them.
    """
    total = sum(width if attn else _ranked(width, of) for _, _, width, attn, of in groups)
    floor = sum(min(_ranked(width, of), _unit(round_to, of))
                for _, _, width, attn, of in groups if not attn)
    keep = int(total * (1 - ratio))
    if keep < floor:
        short = [_label(name, width, of) for name, _, width, attn, of in groups if not attn]
        each = f"round_to={round_to} channels" if round_to else "one channel"
        most = math.floor((1 - floor / total) * 1e4) / 1e4
        raise ConfigError(
            f"ratio={ratio:g} with scope='global' keeps {keep} of the {total} channels, too few "
            f"to leave {each} in each of {', '.join(short)}: use a ratio of at most {most:g}, "
            "or add layers to ignored_layers.")
    return [(module, width, of) for _, module, width, attn, of in groups if not attn], total


def _check_removed(pruner: Any, budget: tuple[list[tuple[nn.Module, int, int]], int],
                   ratio: float) -> None:
    """After global pruning: ``ratio`` of the ranked channels went (no group was skipped).

    Each group that reached one channel leaves the ranking, so the channels kept may exceed
    ``int(total * (1 - ratio))`` by one per group. Attention groups lose heads, not width,
    so a model with them is not checked.
    """
    roots, total = budget
    if sum(_ranked(width, of) for _, width, of in roots) != total:
        return
    kept = sum(_ranked(pruner.DG.get_out_channels(module) or 0, of) for module, _, of in roots)
    if kept > int(total * (1 - ratio)) + len(roots):
        raise ModelError(
            f"{_FUNC} with scope='global' kept {kept} of {total} channels, not the "
            f"{int(total * (1 - ratio))} that ratio={ratio:g} asks for: a group was skipped. "
            "Use scope='layer'.")


@contextlib.contextmanager
def _explained(model: nn.Module, example_inputs: Any) -> Iterator[None]:
    """torch-pruning's asserts and shape errors as a ``ModelError`` with context."""
    try:
        yield
    except EdgeslimError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{_FUNC} could not prune {type(model).__name__} traced on inputs of shape "
            f"{describe(example_inputs)}: {first}. Add the layer it names to ignored_layers."
        ) from exc
