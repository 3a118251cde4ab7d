"""examples/seed_perceptron.py against a plain numpy transcription of the seed's code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed_perceptron.py"
XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("seed_perceptron_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# ---- the seed's code, transcribed (only the initial weights are seeded) -------------------
def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sigmoid_derivative(x):
    return x * (1 - x)


class Perceptron:
    def __init__(self, input_size, hidden_size, output_size, seed=0):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        rng = np.random.default_rng(seed)
        self.weights1 = rng.standard_normal((input_size, hidden_size))
        self.weights2 = rng.standard_normal((hidden_size, output_size))

    def forward(self, X):
        self.hidden_layer = sigmoid(np.dot(X, self.weights1))
        self.output_layer = sigmoid(np.dot(self.hidden_layer, self.weights2))
        return self.output_layer

    def backward(self, X, y, output, learning_rate):
        output_error = y - output
        output_delta = output_error * sigmoid_derivative(output)
        hidden_error = output_delta.dot(self.weights2.T)
        hidden_delta = hidden_error * sigmoid_derivative(self.hidden_layer)
        self.weights2 += self.hidden_layer.T.dot(output_delta) * learning_rate
        self.weights1 += X.T.dot(hidden_delta) * learning_rate

    def train(self, X, y, epochs, learning_rate):
        for _ in range(epochs):
            output = self.forward(X)
            self.backward(X, y, output, learning_rate)

    def predict(self, X):
        return self.forward(X)


def prune_weights(weights, threshold):
    return np.where(np.abs(weights) < threshold, 0, weights)


def quantize_weights(weights, levels):
    return np.round(weights * levels) / levels


def seed_reference(epochs=100, learning_rate=0.01, threshold=0.01, levels=2):
    X = XOR
    y = np.array([[0], [1], [1], [0]])
    p = Perceptron(2, 4, 1)
    p.train(X, y, epochs=epochs, learning_rate=learning_rate)
    trained = (p.weights1.copy(), p.weights2.copy())
    float_pred = p.predict(X)
    p.weights1 = prune_weights(p.weights1, threshold)
    p.weights2 = prune_weights(p.weights2, threshold)
    pruned = (p.weights1.copy(), p.weights2.copy())
    p.weights1 = quantize_weights(p.weights1, levels)
    p.weights2 = quantize_weights(p.weights2, levels)
    return trained, float_pred, pruned, (p.weights1, p.weights2), p.predict(X), p
# -------------------------------------------------------------------------------------------


def test_example_reproduces_the_seed(example):
    trained, float_pred, pruned, quantized, pred, _ = seed_reference()
    r = example.run()
    for ours, ref in zip(r.trained, trained, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.trained_predictions, float_pred, rtol=0, atol=1e-6)
    for ours, ref in zip(r.pruned, pruned, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    for ours, ref in zip(r.quantized, quantized, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.predictions, pred, rtol=0, atol=1e-6)
    assert r.predictions.shape == (4, 1)
    # the seed's pruning objective, sum ||w - w~||^2
    objective = sum(float(((t - p) ** 2).sum()) for t, p in zip(trained, pruned, strict=True))
    assert r.prune_result.objective == pytest.approx(objective, abs=1e-12)


def test_example_prunes_something_with_a_larger_threshold(example):
    # at 0.01 the seed's randn weights keep everything; a threshold that bites checks the path
    trained, _, pruned, quantized, pred, _ = seed_reference(threshold=0.2)
    r = example.run(threshold=0.2)
    assert sum(int((w == 0).sum()) for w in pruned) > 0
    for ours, ref in zip(r.pruned + r.quantized, pruned + quantized, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.predictions, pred, rtol=0, atol=1e-6)
    objective = sum(float(((t - p) ** 2).sum()) for t, p in zip(trained, pruned, strict=True))
    assert r.prune_result.objective == pytest.approx(objective, rel=1e-9)


def test_minmax_8_bit_part_matches_the_seed_formula(example):
    _, float_pred, pruned, _, _, p = seed_reference()
    r = example.run(bits=8)
    for ours_codes, ours, w in zip(r.minmax_codes, r.minmax, pruned, strict=True):
        lo, hi = w.min(), w.max()
        q = np.round((w - lo) / (hi - lo) * 255)  # Q(x) = round((x - xmin)/(xmax - xmin) * L)
        np.testing.assert_array_equal(ours_codes, q)
        np.testing.assert_allclose(ours, lo + q * (hi - lo) / 255, rtol=0, atol=1e-12)
    w1, w2 = pruned
    p.weights1 = w1.min() + np.round((w1 - w1.min()) / (w1.max() - w1.min()) * 255) * (
        (w1.max() - w1.min()) / 255
    )
    p.weights2 = w2.min() + np.round((w2 - w2.min()) / (w2.max() - w2.min()) * 255) * (
        (w2.max() - w2.min()) / 255
    )
    np.testing.assert_allclose(r.minmax_predictions, p.predict(XOR), rtol=0, atol=1e-6)
    # 8 bits stays far closer to the float model than the seed's two levels
    assert np.abs(r.minmax_predictions - float_pred).max() < 1e-3
    assert np.abs(r.minmax_predictions - float_pred).max() < np.abs(
        r.predictions - float_pred
    ).max()


def test_main_prints_the_predictions(example, capsys):
    example.main()
    out = capsys.readouterr().out
    r = example.run()
    assert "predictions (the seed's output)" in out
    assert f"{r.predictions[0, 0]:.6f}" in out
    assert "min-max 8-bit predictions" in out
