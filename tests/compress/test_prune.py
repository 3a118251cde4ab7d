"""Unstructured magnitude pruning: the seed's objective, schedules, accuracy, clean models."""

from __future__ import annotations

import copy
import itertools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.compress.prune import measure_sparsity, polynomial_schedule, prune
from edgeslim.compress.train import accuracy
from edgeslim.errors import ConfigError, ModelError
from edgeslim.zoo.digits import DigitsMLP, digits_loaders


@st.composite
def small_models(draw) -> nn.Module:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        ch = draw(st.integers(1, 4))
        layers += [nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.Flatten()]
        width = ch * 16
    else:
        width = 16
    for out in draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)):
        layers += [nn.Linear(width, out, bias=draw(st.booleans())), nn.ReLU()]
        width = out
    return nn.Sequential(nn.Unflatten(1, (1, 4, 4)), *layers[:-1])


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        name: m.weight.detach().double().numpy().copy()
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


@settings(max_examples=60, deadline=None)
@given(
    model=small_models(),
    by=st.sampled_from(["sparsity", "threshold"]),
    amount=st.floats(0.0, 0.99),
    scope=st.sampled_from(["global", "layer"]),
)
def test_objective_is_the_sum_of_squares_of_the_removed_weights(model, by, amount, scope):
    before = _weights(model)
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("weight")}
    kwargs = {"sparsity": amount} if by == "sparsity" else {"threshold": amount * 0.5}
    res = prune(model, scope=scope, progress=False, **kwargs)
    after = _weights(res.model)

    removed = np.concatenate([before[k][after[k] == 0] for k in before])
    expected = math.fsum((removed**2).tolist())
    assert math.isclose(res.objective, expected, rel_tol=1e-9, abs_tol=1e-12)
    # the seed's definition, L = sum ||w - w~||^2, and the per-layer split
    direct = math.fsum(float(((before[k] - after[k]) ** 2).sum()) for k in before)
    assert math.isclose(res.objective, direct, rel_tol=1e-9, abs_tol=1e-12)
    for k in before:
        layer_removed = before[k][after[k] == 0]
        assert math.isclose(res.layers[k].objective, float((layer_removed**2).sum()),
                            rel_tol=1e-9, abs_tol=1e-12)
        # kept weights are untouched
        np.testing.assert_array_equal(after[k][after[k] != 0], before[k][after[k] != 0])

    n = sum(w.size for w in before.values())
    zeros = sum(int((w == 0).sum()) for w in after.values())
    if by == "threshold":
        for k in before:  # the seed's rule: np.where(np.abs(w) < threshold, 0, w)
            seed = np.where(np.abs(before[k]) < amount * 0.5, 0, before[k])
            np.testing.assert_array_equal(after[k], seed)
    elif scope == "global":
        assert zeros == round(amount * n)
        kept = np.concatenate([np.abs(before[k][after[k] != 0]) for k in before])
        if removed.size and kept.size:  # the smallest magnitudes, ranked across layers
            assert np.abs(removed).max() <= kept.min()
    else:
        for k in before:
            assert int((after[k] == 0).sum()) == round(amount * before[k].size)
    assert res.sparsity == pytest.approx(zeros / n)
    assert res.nonzero_params == sum(int(torch.count_nonzero(p)) for p in res.model.parameters())
    assert res.params == sum(p.numel() for p in res.model.parameters())
    # biases and BatchNorm are untouched
    for k, v in res.model.state_dict().items():
        if not k.endswith("weight") or k in others:
            torch.testing.assert_close(v, others[k], rtol=0, atol=0)


@pytest.fixture(scope="module")
def loaders():
    return digits_loaders(batch_size=128, seed=0)


@pytest.mark.slow
def test_digits_cnn_80_percent_global_sparsity_keeps_accuracy(digits_cnn, loaders):
    train, test = loaders
    dense_state = copy.deepcopy(digits_cnn.state_dict())
    dense_acc = accuracy(digits_cnn, test)
    shot = prune(digits_cnn, sparsity=0.8, scope="global", progress=False)
    res = prune(
        digits_cnn, sparsity=0.8, scope="global", train_data=train, epochs=2, lr=1e-3,
        progress=False,
    )
    sparse_acc = accuracy(res.model, test)
    print(f"digits-cnn dense {dense_acc:.4f}, 80% global sparse + 2 epochs {sparse_acc:.4f}")
    assert sparse_acc >= dense_acc - 0.01
    assert res.sparsity == pytest.approx(0.8, abs=1e-4)
    # the objective is measured at pruning time, before fine-tuning
    assert res.objective == pytest.approx(shot.objective, rel=1e-12)
    # fine-tuning ran, and the zeros held through it and are plain zeros now
    fc1_shot, fc1 = shot.model.fc1.weight, res.model.fc1.weight
    assert not torch.equal(fc1, fc1_shot)
    for name, layer in measure_sparsity(res.model).items():
        assert layer.sparsity == res.layers[name].sparsity
        zeros = getattr(shot.model, name).weight == 0
        assert torch.all(getattr(res.model, name).weight[zeros] == 0)
    # no hooks, parametrizations or extra state left behind; the input model is untouched
    assert list(res.model.state_dict()) == list(dense_state)
    for m in res.model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not hasattr(m, "parametrizations")
    for k, v in digits_cnn.state_dict().items():
        assert torch.equal(v, dense_state[k])
    assert res.params == sum(p.numel() for p in digits_cnn.parameters())
    assert res.nonzero_params < 0.3 * res.params


def test_polynomial_schedule_is_zhu_gupta():
    for final, steps, initial in [(0.8, 5, 0.0), (0.9, 10, 0.2), (0.5, 1, 0.0)]:
        got = polynomial_schedule(final, steps, initial)
        want = [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]
        assert got == pytest.approx(want, abs=1e-15)
        assert got[-1] == pytest.approx(final)
        assert all(a <= b for a, b in itertools.pairwise(got))


def test_gradual_schedule_reaches_the_target_with_fine_tuning(loaders):
    train, _ = loaders
    torch.manual_seed(0)
    model = DigitsMLP(hidden=(64, 32))
    small = [b for _, b in zip(range(3), train, strict=False)]
    before = copy.deepcopy(model)
    res = prune(
        model, sparsity=0.9, schedule="gradual", steps=4, initial_sparsity=0.1,
        train_data=small, epochs=4, progress=False,
    )
    assert res.schedule == pytest.approx([0.9 - 0.8 * (1 - t / 4) ** 3 for t in (1, 2, 3, 4)])
    assert res.sparsity == pytest.approx(0.9, abs=1e-3)
    assert res.config["schedule"] == "gradual" and res.config["steps"] == 4
    # every step's pruning counted in the objective, weights changed by fine-tuning
    assert res.objective > 0
    assert not torch.equal(res.model.fc2.weight[res.model.fc2.weight != 0],
                           before.fc2.weight[res.model.fc2.weight != 0])
    summary = res.to_dict()
    assert summary["step"] == "prune" and summary["metrics"]["sparsity"] == res.sparsity


def test_layer_scope_and_ignored_layers():
    torch.manual_seed(0)
    model = DigitsMLP()
    res = prune(model, sparsity=0.5, scope="layer", ignored_layers=["fc3"], progress=False)
    assert set(res.layers) == {"fc1", "fc2"}
    for name in ("fc1", "fc2"):
        assert res.layers[name].sparsity == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(res.model.fc3.weight, model.fc3.weight)
    res = prune(model, sparsity=0.5, ignored_layers=[model.fc1], progress=False)
    assert set(res.layers) == {"fc2", "fc3"}


def test_bad_inputs_are_typed_errors_naming_the_value():
    model = DigitsMLP()
    msg = (
        "The 'sparsity' parameter of prune must be a float in the range [0.0, 1.0). "
        "Got 1.3 instead."
    )
    with pytest.raises(ConfigError) as info:
        prune(model, sparsity=1.3)
    assert str(info.value) == msg
    with pytest.raises(ConfigError, match="exactly one of"):
        prune(model)
    with pytest.raises(ConfigError, match=r"sparsity=0\.5, threshold=0\.1"):
        prune(model, sparsity=0.5, threshold=0.1)
    with pytest.raises(ConfigError, match=r"'threshold'.*Got -1\.0"):
        prune(model, threshold=-1.0)
    with pytest.raises(ConfigError, match=r"'scope'.*'global', 'layer'.*Got 'model'"):
        prune(model, sparsity=0.5, scope="model")
    with pytest.raises(ConfigError, match=r"'schedule'.*Got 'cubic'"):
        prune(model, sparsity=0.5, schedule="cubic")
    with pytest.raises(ConfigError, match=r"'train_data'.*epochs=3"):
        prune(model, sparsity=0.5, epochs=3)
    with pytest.raises(ConfigError, match=r"gradual.*threshold=0\.1"):
        prune(model, threshold=0.1, schedule="gradual")
    with pytest.raises(ConfigError, match=r"'fc9'.*'fc1', 'fc2', 'fc3'"):
        prune(model, sparsity=0.5, ignored_layers=["fc9"])
    with pytest.raises(ModelError, match="Got list instead"):
        prune([1, 2, 3], sparsity=0.5)
    with pytest.raises(ModelError, match=r"no Linear or convolution layer.*ReLU"):
        prune(nn.ReLU(), sparsity=0.5)


@pytest.mark.parametrize(("train_data", "kwargs", "phrase"), [
    (5, {}, "must be an iterable of (inputs, labels) batches. Got int"),
    ("empty", {}, "yielded no batches"),
    ("first", {}, "cannot train on batch 0 of shape [(64, 64)]: tuple index out of range"),
    ("float-labels", {}, "expected target dtype to be Long"),
    ("big-labels", {}, "Target 108 is out of bounds. Batches must be"),
    ("narrow", {}, "cannot train on batch 0 of shape [(64, 10), (64,)]"),
    ("good", {"loss_fn": 3}, "'loss_fn' of fine-tuning must be callable"),
])
def test_training_data_the_model_cannot_train_on_is_a_config_error(digits_cnn, train_data,
                                                                   kwargs, phrase):
    import torch

    from edgeslim.zoo.digits import digits_loaders

    x, y = next(iter(digits_loaders()[0]))
    data = {"empty": [], "first": [(x,)], "float-labels": [(x, y.float())],
            "big-labels": [(x, y + 100)], "narrow": [(x[:, :10], y)],
            "good": [(x, y)]}.get(str(train_data), train_data)
    before = [p.detach().clone() for p in digits_cnn.parameters()]
    with pytest.raises(ConfigError) as info:
        prune(digits_cnn, sparsity=0.5, epochs=1, train_data=data, progress=False, **kwargs)
    assert phrase in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, digits_cnn.parameters(), strict=True))


def test_ignored_layers_takes_one_name_and_refuses_what_is_not_a_layer(digits_cnn):
    one = prune(digits_cnn, sparsity=0.5, ignored_layers="fc2", progress=False)
    assert float((one.model.fc2.weight == 0).float().mean()) == 0.0  # fc2 untouched
    assert float((one.model.fc1.weight == 0).float().mean()) > 0.3
    for bad, phrase in (([3], "Got 3 (int)"), (7, "Got int instead")):
        with pytest.raises(ConfigError, match=re.escape(phrase)):
            prune(digits_cnn, sparsity=0.5, ignored_layers=bad, progress=False)


def test_numpy_scalars_are_numbers_like_any_other(digits_cnn):
    """Parameters often come out of numpy (a sweep, a config): np.float32(0.5) is 0.5."""
    a = prune(digits_cnn, sparsity=np.float32(0.5), epochs=np.int64(0), progress=False)
    b = prune(digits_cnn, sparsity=0.5, epochs=0, progress=False)
    assert a.sparsity == pytest.approx(b.sparsity) and a.objective == pytest.approx(b.objective)
    with pytest.raises(ConfigError, match="Got True instead"):
        prune(digits_cnn, sparsity=True, progress=False)


def test_checking_the_training_data_draws_no_random_numbers(digits_mlp):
    """A shuffled DataLoader's iterator draws its seed from torch's RNG: the checks must not
    make one, or the same seed would give another model than before (make demo did)."""
    from edgeslim.compress.train import fit

    x = torch.rand(32, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        x, torch.zeros(32, dtype=torch.long)), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    fit(copy.deepcopy(digits_mlp), loader, epochs=0, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
