"""The model as torch-pruning's dependency graph (DepGraph), with edgeslim's checks around it.

torch-pruning traces one forward pass and groups every parameter that must shrink together
(a conv's output channels, the BatchNorm after it, the next layer's input channels, both
sides of a residual sum...). What this module adds:

- the model is run on the example inputs first, and a failure is a ``ModelError`` naming
  the input shapes instead of a traceback from deep inside the trace;
- the layers whose pruning would change the width of a model output (the final classifier,
  the last hidden state of an encoder) are found in the graph and left whole, so the output
  shape never changes;
- ``ignored_layers`` may name layers by their qualified name as well as pass the modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgeslim.compress._batch import call_model, describe, to_torch
from edgeslim.errors import ConfigError, ModelError

__all__ = [
    "ROOT_TYPES",
    "build_graph",
    "check_model",
    "coupled_roots",
    "output_layers",
    "resolve_layers",
    "run_example",
    "tied_layers",
    "trainable",
]

# Layers that can root a pruning group (their output channels are what gets removed).
# nn.LSTM is not one: torch-pruning cannot narrow its hidden size consistently (the
# pruning failed with "index out of range in self"); it follows the layer before it.
ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


def check_model(model: Any, func: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{func} needs a torch.nn.Module. Got {type(model).__name__} instead; "
            "load zoo names and files with edgeslim.load_model first."
        )
    return model


def forward(model: nn.Module, inputs: Any) -> Any:
    """How the graph is traced: see ``edgeslim.compress._batch.call_model``."""
    return call_model(model, inputs)


def run_example(model: nn.Module, example_inputs: Any, func: str, *,
                pruned: bool = False) -> list[tuple[int, ...]]:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad); the output shapes.

    Raises ``ModelError`` naming the input shapes when the model cannot run them; with
    ``pruned`` (the model ran them before ``func`` pruned it) it blames the pruning.
    """
    example_inputs = to_torch(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward(model, example_inputs)
    except Exception as exc:  # any failure inside the user's forward
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if pruned:
            raise ModelError(
                f"{func} left a model that no longer runs on the example inputs ({first}): a "
                "layout the dependency graph does not follow (such as a concatenation "
                "flattened into a Linear). Add the layers around it to ignored_layers."
            ) from None
        raise ModelError(
            f"{func} could not run the model on example_inputs of shape "
            f"{describe(example_inputs)}: {first}. Pass example_inputs the model accepts "
            "(a tensor, a tuple of positional inputs or a dict of keyword inputs)."
        ) from None
    finally:
        model.train(was_training)
    shapes = [tuple(t.shape) for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)]
    if not shapes:
        raise ModelError(f"{func}: the model returned {type(out).__name__}, which holds no tensor.")
    return shapes


@contextlib.contextmanager
def trainable(model: nn.Module) -> Iterator[None]:
    """Every parameter requires grad inside (tracing and Taylor scores need autograd); the
    previous flags are restored by parameter name afterwards (pruning replaces the tensors)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))


def build_graph(model: nn.Module, example_inputs: Any) -> tuple[tp.DependencyGraph, set[Any]]:
    """Trace ``model``; returns the graph and the autograd nodes of the model's outputs."""
    outputs: set[Any] = set()

    def remember(out: Any) -> Any:
        for t in tp.utils.flatten_as_list(out):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                outputs.add(t.grad_fn)
        return out

    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example_inputs, forward_fn=forward, output_transform=remember
    )
    return graph, outputs


def output_layers(
    graph: tp.DependencyGraph, outputs: set[Any], ignored: Iterable[nn.Module] = ()
) -> list[nn.Module]:
    """Root layers whose pruning group would change the width of a model output.

    A group changes an output when it removes output channels of a node that produced an
    output tensor (removing the final classifier's *input* features is fine).
    """
    out_nodes = {node for node in graph.module2node.values() if node.grad_fn in outputs}
    found: list[nn.Module] = []
    for group in graph.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES):
        for dep, _ in group:
            if dep.target in out_nodes and graph.is_out_channel_pruning_fn(dep.handler):
                found.append(group[0].dep.target.module)
                break
    return found


def tied_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{parameter name: names of the modules holding it}`` for every parameter that
    several modules share (an embedding tied to the output head)."""
    owners: dict[int, dict[int, str]] = {}  # parameter -> distinct module -> its first name
    first: dict[int, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            first.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
            owners.setdefault(id(p), {}).setdefault(id(module), mname)
    # one module registered under two names (self.first = self.body[0]) shares nothing
    return {first[k]: sorted(v.values()) for k, v in owners.items() if len(v) > 1}


def coupled_roots(
    graph: tp.DependencyGraph, layers: Iterable[nn.Module], ignored: Iterable[nn.Module] = ()
) -> list[nn.Module]:
    """Root layers of the groups that would prune any of ``layers`` (in or out channels)."""
    wanted = {id(m) for m in layers}
    found: list[nn.Module] = []
    for group in graph.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES):
        if any(id(dep.target.module) in wanted for dep, _ in group):
            found.append(group[0].dep.target.module)
    return found


def resolve_layers(
    model: nn.Module, layers: Iterable[Any] | None, name: str, func: str,
    original: nn.Module | None = None,
) -> list[nn.Module]:
    """Modules of ``model`` for ``layers`` given as qualified names or modules.

    ``original`` is the model the user holds when ``model`` is a copy of it: modules of the
    original are mapped to the copy by name. Raises ``ConfigError`` listing the layer names
    when a name or module is not part of the model.
    """
    if layers is None:
        return []
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in model.named_modules()}
    if original is not None:
        by_id.update({id(m): n for n, m in original.named_modules()})
    resolved: list[nn.Module] = []
    for item in layers:
        if isinstance(item, str):
            key = item
        elif isinstance(item, nn.Module):
            key = by_id.get(id(item))
            if key is None:
                raise ConfigError(
                    f"The '{name}' parameter of {func} holds a {type(item).__name__} that is "
                    "not part of the model. Pass modules of the model or their names."
                )
        else:
            raise ConfigError(
                f"The '{name}' parameter of {func} must hold layer names or modules. "
                f"Got {item!r} instead."
            )
        if key not in modules:
            raise ConfigError(
                f"The '{name}' parameter of {func} names a layer the model does not have: "
                f"{key!r}. Layers are: {_list_names(modules)}."
            )
        resolved.append(modules[key])
    return resolved


def _list_names(modules: dict[str, nn.Module], limit: int = 30) -> str:
    names = [n for n in modules if n]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
