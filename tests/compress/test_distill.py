"""Knowledge distillation: the losses against their formulas, KD against labels-only
training, feature maps with projections, and the checks made before any training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.compress.distill import distill, kl_loss
from edgeslim.compress.train import accuracy, fit
from edgeslim.errors import ConfigError, ModelError
from edgeslim.zoo.digits import DigitsCNN, DigitsMLP, digits_loaders


@pytest.fixture
def one_thread():
    """Small models train faster on one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _subset(split, n: int, seed: int, batch_size: int = 32) -> torch.utils.data.DataLoader:
    """``n`` training images drawn with ``seed``, shuffled in a seeded order."""
    idx = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))[:n]
    idx = idx.numpy()
    ds = torch.utils.data.TensorDataset(
        torch.from_numpy(split.x_train[idx]), torch.from_numpy(split.y_train[idx])
    )
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen)


def test_kl_loss_is_hintons_formula():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)), 3 * rng.normal(size=(5, 7))
    temperature = 2.5

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    expected = temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    got = kl_loss(torch.tensor(s), torch.tensor(t), temperature)
    assert math.isclose(float(got), expected, rel_tol=1e-9)
    assert float(kl_loss(torch.tensor(t), torch.tensor(t), temperature)) == pytest.approx(0)


@pytest.mark.slow
def test_kd_beats_labels_only_for_a_quarter_width_student(digits_cnn, digits_split, one_thread):
    """Same student, data, order, epochs and lr; only the loss differs. Budget: 200 labelled
    images, 60 epochs (the teacher was trained on the whole 1347-image split). Three seeds,
    as bench/distillation.py."""
    _, test = digits_loaders()
    kd, labels = [], []
    for seed in range(3):
        train = _subset(digits_split, 200, seed)
        torch.manual_seed(seed)
        student = DigitsCNN(width=0.25)
        distill(student, digits_cnn, train, epochs=60, lr=3e-3, progress=False)
        kd.append(accuracy(student, test))
        torch.manual_seed(seed)
        student = DigitsCNN(width=0.25)
        fit(student, train, epochs=60, lr=3e-3, progress=False)
        labels.append(accuracy(student, test))
    assert np.mean(kd) > np.mean(labels), (kd, labels)


def test_mse_on_outputs_without_labels_brings_the_student_to_the_teacher(
    digits_mlp, digits_split, one_thread
):
    x = torch.from_numpy(digits_split.x_train)
    unlabelled = [x[i : i + 64] for i in range(0, len(x), 64)]  # bare inputs, no labels
    torch.manual_seed(0)
    student = DigitsMLP(hidden=(64, 32))
    with torch.no_grad():
        before = nn.functional.mse_loss(student(x), digits_mlp(x))
    distill(student, digits_mlp, unlabelled, loss="mse", alpha=1.0, epochs=15, lr=1e-2,
            progress=False)
    with torch.no_grad():
        after = nn.functional.mse_loss(student(x), digits_mlp(x))
    assert after < 0.05 * before
    _, test = digits_loaders()
    assert accuracy(student, test) > 0.9



def test_a_pruned_student_keeps_its_zeros_through_distillation(digits_mlp, digits_split,
                                                                 one_thread):
    from edgeslim.compress.prune import measure_sparsity, prune

    x = torch.from_numpy(digits_split.x_train)
    unlabelled = [x[i : i + 64] for i in range(0, len(x), 64)]
    pruned = prune(digits_mlp, sparsity=0.8, progress=False).model
    zeros = {n: (m.weight == 0).clone() for n, m in pruned.named_modules()
             if isinstance(m, nn.Linear)}
    kept = distill(copy.deepcopy(pruned), digits_mlp, unlabelled, loss="mse", alpha=1.0,
                   epochs=2, lr=1e-2, progress=False)
    for name, m in kept.named_modules():
        if isinstance(m, nn.Linear):
            assert bool((m.weight[zeros[name]] == 0).all()), name
    total = sum(s.params - s.nonzero for s in measure_sparsity(kept).values())
    assert total == sum(int(z.sum()) for z in zeros.values())
    dense = distill(copy.deepcopy(pruned), digits_mlp, unlabelled, loss="mse", alpha=1.0,
                    epochs=2, lr=1e-2, keep_zeros=False, progress=False)
    assert sum(s.params - s.nonzero for s in measure_sparsity(dense).values()) < total // 2

def test_a_zero_initialised_layer_of_the_student_learns(one_thread):
    """Every exactly-zero weight was held as pruned: a student whose classifier head starts
    at zero kept it at zero (digits-cnn at a quarter width: accuracy 0.100 instead of 0.713)."""
    torch.manual_seed(0)
    teacher = DigitsMLP(hidden=(16, 8)).eval()
    student = DigitsMLP(hidden=(16, 8))
    nn.init.zeros_(student.fc3.weight)
    with torch.no_grad():
        student.fc1.weight[:, :32] = 0  # pruned: stays zero
    pruned = student.fc1.weight == 0
    data = [torch.rand(16, 64) for _ in range(4)]
    distill(student, teacher, data, loss="mse", alpha=1.0, epochs=2, lr=1e-2, progress=False)
    assert int(student.fc3.weight.count_nonzero()) == student.fc3.weight.numel()
    assert bool((student.fc1.weight[pruned] == 0).all())


def test_feature_maps_are_matched_through_a_projection(digits_cnn, digits_split, one_thread):
    teacher_state = copy.deepcopy(digits_cnn.state_dict())
    x = torch.from_numpy(digits_split.x_train)
    torch.manual_seed(0)
    student = DigitsCNN(width=1.0)  # same widths: the identity projection, measurable MSE

    def conv1(model):
        with torch.no_grad():
            return model.conv1(x.reshape(-1, 1, 8, 8))

    before = nn.functional.mse_loss(conv1(student), conv1(digits_cnn))
    train = _subset(digits_split, 1347, 0, batch_size=64)
    distill(student, digits_cnn, train, loss="feature", alpha=1.0, epochs=4, lr=1e-2,
            features=[("conv1", "conv1")], progress=False)
    assert nn.functional.mse_loss(conv1(student), conv1(digits_cnn)) < 0.1 * before

    torch.manual_seed(0)
    narrow = DigitsCNN(width=0.25)  # 16 vs 64 channels: a learned 1x1 convolution between
    distill(narrow, digits_cnn, train, loss="kl+feature", epochs=5, lr=3e-3,
            features=[("conv2", "conv2"), ("fc1", "fc1")], progress=False)
    assert narrow.conv2.out_channels == 16 and not hasattr(narrow, "projections")
    _, test = digits_loaders()
    assert accuracy(narrow, test) > 0.8
    # the teacher is left as it was: weights, eval mode, gradients
    assert not digits_cnn.training
    assert all(p.requires_grad for p in digits_cnn.parameters())
    for k, v in digits_cnn.state_dict().items():
        assert torch.equal(v, teacher_state[k])


def test_a_pruned_transformer_learns_back_from_its_original_without_labels(one_thread):
    transformers = pytest.importorskip("transformers")
    from edgeslim.compress.structured import prune_structured

    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16, initializer_range=0.3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    batches = []
    for _ in range(8):  # keyword inputs, no labels
        ids = torch.randint(1, 50, (16, 12))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    student = prune_structured(
        teacher, batches[0], ratio=0.5, head_ratio=0.5, progress=False
    ).model

    def gap() -> float:
        with torch.no_grad():
            return float(sum(
                nn.functional.mse_loss(
                    student(**b).last_hidden_state, teacher(**b).last_hidden_state
                ) for b in batches
            ))

    before = gap()
    distill(student, teacher, batches, loss="mse", alpha=1.0, epochs=20, lr=1e-3,
            progress=False)
    after = gap()
    assert after < 0.5 * before, (before, after)
    assert student.encoder.layer[0].attention.self.num_attention_heads == 2


# -- checks before any work --------------------------------------------------------------------

BATCH = [(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))]


@pytest.mark.parametrize("temperature", [0, -1.0, float("inf"), "4"])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ConfigError, match=r"'temperature'.*> 0.*" + repr(temperature)[:2]):
        distill(DigitsMLP(), DigitsMLP(), BATCH, temperature=temperature, progress=False)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_must_lie_in_0_1(alpha):
    with pytest.raises(ConfigError, match=r"'alpha'.*\[0\.0, 1\.0\].*" + repr(alpha)[:3]):
        distill(DigitsMLP(), DigitsMLP(), BATCH, alpha=alpha, progress=False)


def test_outputs_of_different_shapes_are_refused_with_both_shapes():
    student = DigitsCNN(num_classes=5)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ModelError, match=r"\(4, 5\).*\(4, 10\)"):
        distill(student, DigitsCNN(), BATCH, progress=False)
    for k, v in student.state_dict().items():  # nothing was trained
        assert torch.equal(v, before[k])


def test_unknown_feature_layers_list_the_allowed_names():
    with pytest.raises(ConfigError, match=r"student has no layer named 'conv3'.*'conv1', 'bn1'"):
        distill(DigitsCNN(), DigitsCNN(), BATCH, loss="kl+feature",
                features=[("conv3", "conv2")], progress=False)
    with pytest.raises(ConfigError, match=r"teacher has no layer named 'fc9'.*'fc1'"):
        distill(DigitsCNN(), DigitsMLP(), BATCH, loss="feature",
                features=[("fc1", "fc9")], progress=False)


def test_other_bad_input_is_refused_before_training():
    with pytest.raises(ModelError, match=r"'student'.*str"):
        distill("digits-cnn", DigitsCNN(), BATCH)
    with pytest.raises(ModelError, match=r"'teacher'.*NoneType"):
        distill(DigitsCNN(), None, BATCH)
    with pytest.raises(ConfigError, match=r"'loss'.*'kl\+feature'.*'cosine'"):
        distill(DigitsCNN(), DigitsCNN(), BATCH, loss="cosine", progress=False)
    with pytest.raises(ConfigError, match=r"loss='feature' needs features"):
        distill(DigitsCNN(), DigitsCNN(), BATCH, loss="feature", progress=False)
    with pytest.raises(ConfigError, match=r"loss='kl\+feature'"):
        distill(DigitsCNN(), DigitsCNN(), BATCH, features=[("conv1", "conv1")], progress=False)
    with pytest.raises(ConfigError, match=r"alpha=0\.9.*no labels.*alpha=1\.0"):
        distill(DigitsCNN(), DigitsCNN(), [torch.zeros(4, 64)], progress=False)
    with pytest.raises(ConfigError, match=r"no batches"):
        distill(DigitsCNN(), DigitsCNN(), [], progress=False)
    with pytest.raises(ModelError, match=r"student could not run.*\(4, 10\)"):
        distill(DigitsCNN(), DigitsCNN(), [(torch.zeros(4, 10), torch.zeros(4))], progress=False)
    with pytest.raises(ModelError, match=r"'conv2'.*\(4, 64, 8, 8\).*'fc1'.*\(4, 128\)"):
        distill(DigitsCNN(), DigitsCNN(), BATCH, loss="feature",
                features=[("conv2", "fc1")], progress=False)
    with pytest.raises(ConfigError, match=r"'epochs'.*0"):
        distill(DigitsCNN(), DigitsCNN(), BATCH, epochs=0, progress=False)


def test_bad_training_data_and_the_teacher_as_student_are_refused(digits_mlp):
    from edgeslim.zoo.digits import digits_loaders

    x, y = next(iter(digits_loaders()[0]))
    student = DigitsMLP(hidden=(16, 8))
    with pytest.raises(ModelError, match="are the same module"):
        distill(digits_mlp, digits_mlp, [(x, y)], epochs=1, progress=False)
    for data, phrase in ((None, "Got NoneType"), (5, "Got int"),
                         ([(x, y.float())], "cannot train on batch 0"),
                         ([(x, y + 100)], "Target 108 is out of bounds"),
                         ([(x, y[:5])], "cannot train on batch 0"),
                         ([(x, y), (x[:, :10], y)], "cannot train on batch 1")):
        with pytest.raises((ConfigError, ModelError)) as info:
            distill(student, digits_mlp, data, epochs=1, alpha=0.5, progress=False)
        assert phrase in str(info.value), (phrase, str(info.value))
