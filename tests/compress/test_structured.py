"""Structured pruning: channels, neurons and heads removed for real, checked against a masked
reference (the original model with the removed channels' outgoing weights zeroed must answer
exactly like the pruned one)."""

from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.compress.distill import distill
from edgeslim.compress.structured import StructuredResult, check_structured, prune_structured
from edgeslim.compress.structured.importance import TaylorImportance
from edgeslim.compress.train import accuracy
from edgeslim.errors import ConfigError, ModelError
from edgeslim.export.onnx import export_onnx
from edgeslim.zoo import load_model
from edgeslim.zoo.digits import DigitsCNN, DigitsMLP, digits_loaders

X1 = torch.zeros(1, 64)
CNN_CHAIN = ["conv1", "conv2", "fc1", "fc2"]
MLP_CHAIN = ["fc1", "fc2", "fc3"]


@pytest.fixture
def one_thread():
    """Small models train faster on one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kept(original: nn.Module, pruned: nn.Module) -> list[int]:
    """Indices of the original output channels that survive (matched by their bias)."""
    ob, pb = original.bias.detach(), pruned.bias.detach()
    return [int(torch.nonzero(ob == v)[0]) for v in pb]


def _kept_rows(original: nn.Linear, pruned: nn.Linear) -> list[int]:
    """Surviving output rows of a Linear whose inputs were not pruned (matched by weights)."""
    ow, pw = original.weight.detach(), pruned.weight.detach()
    return [int(torch.nonzero((ow == row).all(1))[0]) for row in pw]


def masked_reference(model: nn.Module, pruned: nn.Module, chain: list[str]) -> nn.Module:
    """The original model with the removed channels' outgoing weights set to zero."""
    ref = copy.deepcopy(model)
    mods, new = dict(ref.named_modules()), dict(pruned.named_modules())
    for producer, consumer in itertools.pairwise(chain):
        width = mods[producer].weight.shape[0]
        removed = sorted(set(range(width)) - set(_kept(mods[producer], new[producer])))
        c = mods[consumer]
        span = c.weight.shape[1] // width  # flatten: one conv channel feeds span features
        with torch.no_grad():
            for r in removed:
                c.weight[:, r * span : (r + 1) * span] = 0
    return ref


def _widths(model: nn.Module, chain: list[str]) -> list[int]:
    return [dict(model.named_modules())[n].weight.shape[0] for n in chain]


# -- the zoo models --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "chain", "expected"),
    [("digits_cnn", CNN_CHAIN, [16, 32, 64, 10]), ("digits_mlp", MLP_CHAIN, [150, 50, 10])],
)
def test_zoo_models_lose_half_their_channels_and_match_the_masked_reference(
    request, digits_split, name, chain, expected
):
    model = request.getfixturevalue(name)
    before = copy.deepcopy(model.state_dict())
    result = prune_structured(model, X1, ratio=0.5, progress=False)
    assert isinstance(result, StructuredResult)
    pruned, report = result.model, result.report
    assert _widths(pruned, chain) == expected  # the classifier keeps its 10 outputs
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after < 0.4 * report.params_before
    assert report.macs_after < 0.4 * report.macs_before
    kept = {w.name: (w.before, w.after) for w in report.layers}
    assert [kept[n][1] for n in chain] == expected
    assert chain[-1] in report.ignored  # protected automatically
    # the original model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.from_numpy(digits_split.x_test[:64])
    ref = masked_reference(model, pruned, chain).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-4, atol=1e-5)
    json.dumps(report.to_dict())
    assert all(n in report.format_table() for n in chain)


@st.composite
def chains(draw) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 4, 4))]
    names: list[str] = []
    width = 16
    if draw(st.booleans()):
        ch = draw(st.integers(2, 6))
        layers += [nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(), nn.Flatten()]
        names.append("1")
        width = ch * 16
    else:
        layers.append(nn.Flatten())
    for out in draw(st.lists(st.integers(2, 12), min_size=1, max_size=3)):
        names.append(str(len(layers)))
        layers += [nn.Linear(width, out), nn.ReLU()]
        width = out
    model = nn.Sequential(*layers[:-1])
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval(), names


@settings(max_examples=25, deadline=None)
@given(
    case=chains(),
    ratio=st.floats(0.0, 0.9),
    importance=st.sampled_from(["l1", "l2"]),
    scope=st.sampled_from(["layer", "global"]),
)
def test_any_chain_matches_its_masked_reference(case, ratio, importance, scope):
    model, chain = case
    x = torch.rand(8, 16)
    keep = [int(n * (1 - ratio)) for n in _widths(model, chain)[:-1]]
    total = sum(_widths(model, chain)[:-1])
    if scope == "layer" and ratio > 0 and min(keep, default=1) < 1:  # a layer would be emptied
        with pytest.raises(ConfigError, match="would leave no channel"):
            prune_structured(model, x[:1], ratio=ratio, importance=importance, scope=scope,
                             progress=False)
        return
    if scope == "global" and ratio > 0 and int(total * (1 - ratio)) < len(chain) - 1:
        with pytest.raises(ConfigError, match="too few to leave one channel in each"):
            prune_structured(model, x[:1], ratio=ratio, importance=importance, scope=scope,
                             progress=False)
        return
    result = prune_structured(
        model, x[:1], ratio=ratio, importance=importance, scope=scope, progress=False
    )
    pruned = result.model
    widths = _widths(pruned, chain)
    assert widths[-1] == _widths(model, chain)[-1]
    assert all(w >= 1 for w in widths)
    if scope == "layer":  # each group keeps int(n * (1 - ratio)) channels, none is skipped
        assert widths[:-1] == keep
    else:  # all groups together keep int(total * (1 - ratio)), none is skipped
        assert sum(widths[:-1]) <= int(total * (1 - ratio))
    ref = masked_reference(model, pruned, chain)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_digits_cnn_pruned_by_half_and_distilled_stays_within_1_5_points(
    digits_cnn, one_thread
):
    train, test = digits_loaders(seed=0)
    dense = accuracy(digits_cnn, test)
    result = prune_structured(digits_cnn, X1, ratio=0.5, importance="l2", progress=False)
    pruned = result.model
    assert _widths(pruned, CNN_CHAIN) == [16, 32, 64, 10]
    torch.manual_seed(0)
    distill(pruned, digits_cnn, train, epochs=3, lr=1e-3, progress=False)
    acc = accuracy(pruned, test)
    assert acc >= dense - 0.015, (dense, acc)


# -- importance criteria ---------------------------------------------------------------------


def _dead_and_alive() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """fc1 neurons 0-3: large weights but never active on the data; 4-7: small but active."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:4] = 5.0 * torch.randn(4, 4).abs().neg()
        model[0].bias[:4] = -1.0 - 0.1 * torch.arange(4)  # inputs >= 0: stays below zero
        model[0].weight[4:] = 0.1 * torch.rand(4, 4)
        model[0].bias[4:] = 0.1 + 0.01 * torch.arange(4)
        model[2].weight[:, :4] = 3.0
    x = torch.rand(64, 4)
    y = torch.randint(0, 3, (64,))
    return model, x, y


@pytest.mark.parametrize(
    ("importance", "survivors"),
    [("l2", [0, 1, 2, 3]), ("l1", [0, 1, 2, 3]), ("activation", [4, 5, 6, 7]),
     ("taylor", [4, 5, 6, 7])],
)
def test_data_driven_criteria_remove_the_neurons_that_do_not_affect_the_output(
    importance, survivors
):
    model, x, y = _dead_and_alive()
    data = [(x[:32], y[:32]), (x[32:], y[32:])]
    result = prune_structured(
        model, x[:1], ratio=0.5, importance=importance, data=data, progress=False
    )
    assert sorted(_kept(model[0], result.model[0])) == survivors
    if importance in ("activation", "taylor"):  # the removed neurons were dead: same answers
        with torch.no_grad():
            torch.testing.assert_close(result.model(x), model(x))


def test_taylor_scores_are_the_squared_activation_gradient_products():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(3)]
    # reference: per batch (sum over examples of h_j * dL/dh_j)^2, summed over batches
    ref = torch.zeros(6)
    for x, y in batches:
        h = model[1](model[0](x)).detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model[2](h), y)
        (g,) = torch.autograd.grad(loss, h)
        ref += (h * g).sum(0).detach() ** 2
    scorer = TaylorImportance()
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        scorer.accumulate(model)
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 5))
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, list(range(6)))
    torch.testing.assert_close(scorer(group), ref / ref.mean(), rtol=1e-4, atol=1e-6)


def test_global_scope_ranks_across_layers_and_keeps_the_output(digits_mlp):
    result = prune_structured(digits_mlp, X1, ratio=0.5, scope="global", progress=False)
    w = _widths(result.model, MLP_CHAIN)
    assert w[2] == 10
    assert w[0] + w[1] <= 0.55 * 400 and w[0] != 150  # uneven: ranked globally
    assert result.model(X1).shape == (1, 10)


@pytest.mark.parametrize("ratio", [0.8, 0.9])
def test_global_scope_removes_ratio_of_all_channels_and_skips_no_layer(digits_cnn, ratio):
    """torch-pruning skips a group whose channels all rank below the global threshold: at 0.8
    conv2 stayed at 64 channels, at 0.9 conv1 and conv2 both stayed whole."""
    result = prune_structured(digits_cnn, X1, ratio=ratio, scope="global", progress=False)
    widths = _widths(result.model, CNN_CHAIN)
    assert widths[3] == 10
    assert all(1 <= w < n for w, n in zip(widths[:3], [32, 64, 128], strict=True)), widths
    assert sum(widths[:3]) <= int(224 * (1 - ratio))
    half = prune_structured(digits_cnn, X1, ratio=0.5, scope="global", progress=False)
    assert result.report.params_after < half.report.params_after
    with pytest.raises(ConfigError, match=re.escape(
            "ratio=0.99 with scope='global' keeps 2 of the 224 channels, too few to leave one "
            "channel in each of fc1 (128), conv2 (64), conv1 (32): use a ratio of at most")):
        prune_structured(digits_cnn, X1, ratio=0.99, scope="global", progress=False)


def test_iterative_steps_reach_the_same_widths_and_call_back(digits_cnn):
    seen = []
    result = prune_structured(
        digits_cnn, X1, ratio=0.5, iterative_steps=3, progress=False,
        after_step=lambda m, step: seen.append((step, m.conv2.out_channels)),
    )
    assert [s for s, _ in seen] == [0, 1, 2]
    assert [c for _, c in seen] == [53, 42, 32]
    assert _widths(result.model, CNN_CHAIN) == [16, 32, 64, 10]


def test_round_to_keeps_widths_multiples(digits_cnn):
    result = prune_structured(digits_cnn, X1, ratio=0.3, round_to=8, progress=False)
    assert [w % 8 for w in _widths(result.model, CNN_CHAIN)[:3]] == [0, 0, 0]


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"ratio": 0.97}, "would leave no channel in conv1 (32): use a ratio below 0.9688"),
    ({"ratio": 0.99}, "conv1 (32)"),
    ({"ratio": 0.5, "round_to": 48}, "round_to=48 is more than they keep"),
])
def test_a_ratio_or_round_to_no_layer_can_reach_is_refused_not_skipped(digits_cnn, kwargs,
                                                                        phrase):
    """torch-pruning would skip such a layer silently: at 0.99 conv1 and conv2 stayed whole."""
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        prune_structured(digits_cnn, torch.zeros(1, 64), progress=False, **kwargs)
    near = prune_structured(digits_cnn, torch.zeros(1, 64), ratio=0.95, progress=False).model
    assert (near.conv1.out_channels, near.conv2.out_channels) == (1, 3)  # every layer pruned


def test_check_structured_refuses_as_prune_structured_does_and_prunes_nothing(digits_cnn):
    """The check planners run before proposing settings is the pruner's own."""
    before = copy.deepcopy(digits_cnn.state_dict())
    with pytest.raises(ConfigError) as pruned:
        prune_structured(digits_cnn, X1, ratio=0.8, round_to=8, progress=False)
    with pytest.raises(ConfigError) as checked:
        check_structured(digits_cnn, X1, ratio=0.8, round_to=8)
    assert str(checked.value) == str(pruned.value)
    check_structured(digits_cnn, X1, ratio=0.7, round_to=8)
    check_structured(digits_cnn, X1, ratio=0.8, scope="global", round_to=8)
    assert all(torch.equal(v, before[k]) for k, v in digits_cnn.state_dict().items())

def test_ignored_layers_by_name_or_module_of_the_original(digits_cnn):
    by_name = prune_structured(digits_cnn, X1, ratio=0.5, ignored_layers=["conv1"], progress=False)
    by_module = prune_structured(
        digits_cnn, X1, ratio=0.5, ignored_layers=[digits_cnn.fc1], progress=False
    )
    assert _widths(by_name.model, CNN_CHAIN) == [32, 32, 64, 10]
    assert _widths(by_module.model, CNN_CHAIN) == [16, 32, 128, 10]
    with pytest.raises(ConfigError, match=r"'conv9'.*'conv1'"):
        prune_structured(digits_cnn, X1, ratio=0.5, ignored_layers=["conv9"], progress=False)


def test_tied_weights_stay_tied_and_their_layers_whole(caplog):
    """Pruning gave an Embedding and the output head tied to it each its own narrower copy:
    the tie was lost and the model grew (592 -> 616 parameters)."""
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 16)
            self.up = nn.Linear(16, 64)
            self.down = nn.Linear(64, 16)
            self.lm_head = nn.Linear(16, 50, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            h = self.wte(ids)
            return self.lm_head(h + self.down(torch.relu(self.up(h))))

    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 6))
    with caplog.at_level("INFO", logger="edgeslim.compress.structured"):
        result = prune_structured(model, ids, ratio=0.5, progress=False)
    pruned = result.model
    assert pruned.lm_head.weight is pruned.wte.weight
    assert pruned.wte.weight.shape == (50, 16) and pruned.up.out_features == 32
    assert result.report.params_after == sum(p.numel() for p in pruned.parameters())
    assert result.report.params_after < result.report.params_before
    assert {"wte", "lm_head"} <= set(result.report.ignored) and pruned.down.out_features == 16
    assert "wte.weight (lm_head, wte)" in caplog.text
    assert pruned(ids).shape == (2, 6, 50)


def test_global_scope_prunes_a_model_with_a_grouped_convolution():
    """The global floor counted a grouped conv's full width where torch-pruning ranks
    width / groups entries: such models were refused after (or halfway through) pruning."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.pw = nn.Conv2d(16, 24, 1)
            self.g = nn.Conv2d(24, 24, 3, padding=1, groups=4)
            self.fc = nn.Linear(24, 5)

        def forward(self, x):
            return self.fc(self.g(self.pw(torch.relu(self.stem(x)))).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    for round_to in (None, 4):
        result = prune_structured(Net().eval(), x, ratio=0.7, scope="global",
                                  round_to=round_to, progress=False)
        assert result.report.params_after < result.report.params_before
        assert result.model(x).shape == (1, 5)


class _InvertedResidual(nn.Module):
    """A depthwise-separable block, then an EfficientNet-lite style inverted residual whose
    expansion is a grouped 1x1 convolution (4 groups). torch-pruning ranks 34 channels: 16
    for stem + dw (pruned together), 6 positions of the 24 residual channels (read by the
    grouped expand) and 12 of the 48 expanded ones (expand + dw2)."""

    def __init__(self):
        super().__init__()
        def block(cin, cout, k=1, groups=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                      nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)
        self.stem = block(3, 16, 3)
        self.dw = block(16, 16, 3, groups=16)
        self.pw = block(16, 24, act=False)
        self.expand = block(24, 48, groups=4)
        self.dw2 = block(48, 48, 3, groups=48)
        self.project = block(48, 24, act=False)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = x + self.project(self.dw2(self.expand(x)))
        return self.head(x.mean((2, 3)))


def _grouped_widths(model: nn.Module) -> list[int]:
    """Widths of the three groups: stem/dw, the residual (pw/project), expand/dw2."""
    return [model.stem[0].out_channels, model.pw[0].out_channels,
            model.expand[0].out_channels]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_global_floor_holds_with_grouped_and_depthwise_convolutions(tmp_path, ratio):
    """The floor was off for any model with a grouped convolution: at 0.9 the expand/dw2
    group ranked below the threshold whole, was skipped and kept all 48 channels."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned = prune_structured(_InvertedResidual().eval(), x[:1], ratio=ratio,
                              scope="global", progress=False).model
    stem, residual, expand = _grouped_widths(pruned)
    assert residual % 4 == 0 and expand % 4 == 0  # the grouped conv keeps 4 equal groups
    ranked = [stem, residual // 4, expand // 4]
    assert all(1 <= k < n for k, n in zip(ranked, [16, 6, 12], strict=True)), ranked
    assert sum(ranked) == int(34 * (1 - ratio))  # exactly ratio of the ranked channels
    assert pruned.dw[0].groups == pruned.dw[0].out_channels == stem  # still depthwise
    assert pruned.expand[0].groups == 4
    export_onnx(pruned, x, tmp_path / "m.onnx", input_names=["x"], output_names=["y"])


@pytest.mark.parametrize(("scope", "ratio", "expected"), [
    ("layer", 0.5, [8, 8, 24]),  # 16 -> 8; 6 positions keep 3, rounded to 2 (8 channels)
    ("global", 0.5, None),
])
def test_round_to_with_a_grouped_convolution_counts_its_positions(scope, ratio, expected):
    """torch-pruning's round_to counted the positions removed from a grouped conv against
    its full width: widths came out wrong (layer) or whole (global: 16, 24, 48 at 0.7)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    pruned = prune_structured(_InvertedResidual().eval(), x, ratio=ratio, scope=scope,
                              round_to=8, progress=False).model
    widths = _grouped_widths(pruned)
    assert [w % 8 for w in widths] == [0, 0, 0] and all(w >= 8 for w in widths)
    if expected is not None:
        assert widths == expected
    else:  # rounding removes more, never less, than the ranked share
        assert sum(w // g for w, g in zip(widths, [1, 4, 4], strict=True)) <= int(34 * 0.5)
        assert widths != [16, 24, 48]
    assert pruned(x).shape == (1, 5)
    with pytest.raises(ConfigError, match=re.escape(
            "ratio=0.7 with scope='global' keeps 10 of the 34 channels, too few to leave "
            "round_to=8 channels in each of")) as refused:
        prune_structured(_InvertedResidual().eval(), x, ratio=0.7, scope="global",
                         round_to=8, progress=False)
    assert "(48 in 4 groups)" in str(refused.value)


def test_a_layer_registered_under_two_names_is_pruned_as_one():
    """self.first = self.body[0] is one module, not a tie: taking it for one refused to prune
    the model at all (a KeyError turned ModelError)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
            self.first = self.body[0]
            self.fc = nn.Linear(64, 5)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    torch.manual_seed(0)
    result = prune_structured(Net().eval(), torch.randn(1, 3, 8, 8), ratio=0.5, progress=False)
    assert (result.model.body[0].out_channels, result.model.body[2].out_channels) == (16, 32)
    assert result.model.first is result.model.body[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_model_with_an_lstm_prunes_the_layer_in_front_of_it(batch_first):
    """With nn.LSTM as a group root every model holding one failed to prune, with an error
    naming no layer ("index out of range in self")."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.lstm = nn.LSTM(8, 16, batch_first=batch_first)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            out, _ = self.lstm(torch.relu(self.inp(x)))
            return self.fc(out[:, -1] if batch_first else out[-1])

    torch.manual_seed(0)
    x = torch.randn(2, 5, 4) if batch_first else torch.randn(5, 2, 4)
    result = prune_structured(Net().eval(), x, ratio=0.5, progress=False)
    pruned = result.model
    assert (pruned.inp.out_features, pruned.lstm.input_size, pruned.lstm.hidden_size) == (4, 4, 16)
    assert pruned(x).shape == (2, 3)


def test_frozen_parameters_and_training_mode_are_restored():
    model = DigitsMLP().train()
    for p in model.fc1.parameters():
        p.requires_grad_(False)
    result = prune_structured(model, X1, ratio=0.5, inplace=True, progress=False)
    assert result.model is model and model.training
    assert model.fc1.out_features == 150
    assert [p.requires_grad for p in model.fc1.parameters()] == [False, False]
    assert all(p.requires_grad for p in model.fc2.parameters())


# -- attention heads ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 100, (2, 16))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_attention_heads_are_removed_whole(tiny_bert):
    model, inputs = tiny_bert
    result = prune_structured(model, inputs, ratio=0.0, head_ratio=0.5, progress=False)
    pruned = result.model
    heads = {w.name: (w.before, w.after) for w in result.report.layers if w.unit == "heads"}
    assert heads == {f"bert.encoder.layer.{i}.attention.self": (4, 2) for i in range(2)}
    ref = copy.deepcopy(model)
    for i in range(2):
        new = pruned.bert.encoder.layer[i].attention.self
        old = ref.bert.encoder.layer[i].attention.self
        assert (new.num_attention_heads, new.all_head_size, new.query.out_features) == (2, 32, 32)
        assert pruned.bert.encoder.layer[i].intermediate.dense.out_features == 128  # ratio=0
        kept_rows = set(_kept_rows(old.query, new.query))
        removed = [h for h in range(4) if not set(range(h * 16, h * 16 + 16)) <= kept_rows]
        assert len(removed) == 2
        with torch.no_grad():  # a head whose values are zero adds nothing
            for h in removed:
                old.value.weight[h * 16 : h * 16 + 16] = 0
                old.value.bias[h * 16 : h * 16 + 16] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(**inputs).logits, ref(**inputs).logits, rtol=1e-4, atol=1e-5
        )


def test_iterative_head_pruning_removes_head_ratio_of_the_original_heads(tiny_bert):
    """torch-pruning compounds each step's head ratio on the heads left: 4 heads at
    head_ratio=0.5 in 2 steps ended with 1 head (12 heads in 3 steps with 3)."""
    model, inputs = tiny_bert
    seen = []
    result = prune_structured(
        model, inputs, ratio=0.0, head_ratio=0.5, iterative_steps=2, progress=False,
        after_step=lambda m, step: seen.append(
            [layer.attention.self.num_attention_heads for layer in m.bert.encoder.layer]),
    )
    assert seen == [[3, 3], [2, 2]]
    heads = {w.name: (w.before, w.after) for w in result.report.layers if w.unit == "heads"}
    assert heads == {f"bert.encoder.layer.{i}.attention.self": (4, 2) for i in range(2)}
    assert result.model(**inputs).logits.shape == (2, 3)
    with pytest.raises(ConfigError, match=re.escape(
            "head_ratio=0.9 would leave no head in bert.encoder.layer.0.attention.self (4 heads), "
            "bert.encoder.layer.1.attention.self (4 heads): use a head_ratio of at most 0.75.")):
        prune_structured(model, inputs, ratio=0.0, head_ratio=0.9, progress=False)


def test_heads_and_widths_together_keep_the_output_shape(tiny_bert):
    model, inputs = tiny_bert
    result = prune_structured(
        model, inputs, ratio=0.5, head_ratio=0.25, importance="activation",
        data=[inputs], progress=False,
    )
    out = result.model(**inputs).logits
    assert out.shape == (2, 3)
    assert result.report.params_after < 0.6 * result.report.params_before
    attn = result.model.bert.encoder.layer[0].attention.self
    assert attn.num_attention_heads == 3 and attn.query.out_features == 48


def test_multihead_attention_narrows_in_whole_heads():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 64)
            self.enc = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.head = nn.Linear(64, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.inp(x)).mean(1))

    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(2, 10, 8)
    result = prune_structured(model, x, ratio=0.3, progress=False)
    attn = result.model.enc.self_attn
    assert attn.embed_dim % 4 == 0 and attn.embed_dim < 64
    assert result.model(x).shape == (2, 5)
    with pytest.raises(ModelError, match=r"head_ratio=0.5"):
        prune_structured(model, x, ratio=0.3, head_ratio=0.5, progress=False)


@pytest.mark.slow
def test_efficientnet_lite0_prunes_through_depthwise_and_squeeze_excitation():
    model = load_model("efficientnet-lite0")
    x = torch.rand(1, 3, 224, 224)
    result = prune_structured(model, x, ratio=0.3, progress=False)
    report, pruned = result.report, result.model
    assert report.ignored == ("_fc",)
    assert report.params_after < 0.6 * report.params_before
    assert 380e6 < report.macs_before < 420e6  # ~400M MACs: every conv subclass counted
    assert report.macs_after < 0.6 * report.macs_before
    for m in pruned.modules():  # depthwise convolutions stay depthwise
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    with torch.no_grad():
        assert pruned(torch.rand(2, 3, 224, 224)).shape == (2, 1000)


@pytest.mark.slow
def test_minilm_l6_loses_half_its_heads_and_data_picks_them_better():
    from edgeslim.zoo import minilm

    model = load_model("minilm-l6")
    calib = minilm.encode([
        "a cat sits on the mat", "edge devices run small models", "the weather is nice today",
        "quantization makes networks smaller", "she plays the piano", "trains leave at noon",
    ])
    held_out = minilm.encode([
        "a dog sleeps on the sofa", "compress the model before shipping it",
        "it is raining outside", "he sings in a choir",
    ])
    with torch.no_grad():
        reference = model(*held_out)
    data = [{"input_ids": calib[0], "attention_mask": calib[1]}]
    cosine = {}
    for importance in ("l2", "activation"):
        result = prune_structured(
            model, held_out, ratio=0.0, head_ratio=0.5, importance=importance, data=data,
            progress=False,
        )
        heads = [w for w in result.report.layers if w.unit == "heads"]
        assert len(heads) == 6 and all((w.before, w.after) == (12, 6) for w in heads)
        with torch.no_grad():
            out = result.model(*held_out)
        assert out.shape == reference.shape == (4, 384)
        cosine[importance] = float((out * reference).sum(1).mean())
    assert cosine["activation"] > max(cosine["l2"], 0.8), cosine


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "half", None, float("nan")])
def test_ratio_outside_0_1_is_refused_with_the_value(ratio):
    with pytest.raises(ConfigError, match=r"'ratio'.*\[0\.0, 1\.0\).*" + repr(ratio)[:3]):
        prune_structured(DigitsMLP(), X1, ratio=ratio, progress=False)


def test_a_model_with_nothing_to_prune_is_refused():
    with pytest.raises(ModelError, match="there is nothing to prune"):
        prune_structured(nn.Sequential(nn.ReLU()), torch.zeros(1, 4), ratio=0.5, progress=False)


def test_bad_inputs_are_typed_errors_naming_the_value():
    with pytest.raises(ModelError, match=r"torch.nn.Module.*str"):
        prune_structured("digits-cnn", X1, ratio=0.5)
    with pytest.raises(ModelError, match=r"\(1, 3, 32, 32\)"):
        prune_structured(DigitsCNN(), torch.zeros(1, 3, 32, 32), ratio=0.5, progress=False)
    with pytest.raises(ModelError, match=r"\{pixels: \(1, 64\)\}"):
        prune_structured(DigitsCNN(), {"pixels": X1}, ratio=0.5, progress=False)
    with pytest.raises(ConfigError, match=r"'importance'.*'taylor'.*'magnitude'"):
        prune_structured(DigitsCNN(), X1, ratio=0.5, importance="magnitude", progress=False)
    with pytest.raises(ConfigError, match=r"'scope'.*'everywhere'"):
        prune_structured(DigitsCNN(), X1, ratio=0.5, scope="everywhere", progress=False)
    with pytest.raises(ConfigError, match=r"importance='taylor'.*data="):
        prune_structured(DigitsCNN(), X1, ratio=0.5, importance="taylor", progress=False)
    with pytest.raises(ConfigError, match=r"labelled"):
        prune_structured(
            DigitsCNN(), X1, ratio=0.5, importance="taylor", data=[X1], progress=False
        )
    with pytest.raises(ModelError, match=r"data.*\(4, 10\)"):
        prune_structured(
            DigitsCNN(), X1, ratio=0.5, importance="activation", data=[torch.zeros(4, 10)],
            progress=False,
        )
    with pytest.raises(ModelError, match=r"head_ratio=0.5.*no attention"):
        prune_structured(DigitsCNN(), X1, ratio=0.5, head_ratio=0.5, progress=False)
    with pytest.raises(ConfigError, match=r"'iterative_steps'.*0"):
        prune_structured(DigitsCNN(), X1, ratio=0.5, iterative_steps=0, progress=False)


def test_a_model_the_pruning_breaks_is_reported_as_broken_by_the_pruning():
    """A concatenation flattened into a Linear is a layout the dependency graph does not
    follow: the pruned model no longer runs. The error says so and points to ignored_layers,
    not at the example inputs (which ran fine before)."""
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c4 = nn.Conv2d(16, 8, 1)
            self.c5 = nn.Conv2d(16, 8, 1)
            self.fc = nn.Linear(16 * 8 * 8, 5)

        def forward(self, x):
            b = torch.relu(self.c1(x))
            return self.fc(torch.cat([self.c4(b), self.c5(b)], 1).flatten(1))

    torch.manual_seed(0)
    with pytest.raises(ModelError, match=r"left a model that no longer runs .* ignored_layers"):
        prune_structured(Cat(), torch.randn(1, 3, 8, 8), ratio=0.5)
