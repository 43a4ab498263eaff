"""The shipped digits classifier, evaluate_samples, and the shipped demo model's quality bar."""
import json

import pytest
import torch

from moeca.data.digits import load_digits_split
from moeca.evaluation.evaluator import (CLASSIFIER_CARD, CLASSIFIER_WEIGHTS, FEATURE_DIM, ClassifierTrainConfig,
                                    DigitsClassifier, evaluate_samples, shipped_dir, train_classifier)


@pytest.fixture(scope="module")
def clf():
    return DigitsClassifier.load_shipped("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_shipped_classifier_reaches_97_percent_on_held_out_digits(clf, digits):
    pred = clf.predict(digits.test_images)
    assert pred.shape == digits.test_labels.shape and pred.dtype == torch.int64
    acc = (pred == digits.test_labels).float().mean().item()
    assert acc >= 0.97
    card = json.loads((shipped_dir() / CLASSIFIER_CARD).read_text())
    assert card["test_accuracy"] == pytest.approx(acc, abs=1e-6)  # the json reports what the weights do
    assert {"seed", "train_seconds", "fd_floor_train_vs_test"} <= set(card)


def test_features_shape(clf, digits):
    feats = clf.features(digits.test_images[:5])
    assert feats.shape == (5, FEATURE_DIM)


def test_real_digits_score_high_accuracy_and_floor_level_fd(clf, digits):
    test = evaluate_samples(digits.test_images, digits.test_labels, clf)
    assert test["accuracy"] >= 0.97
    assert test["fd"] == pytest.approx(0.0, abs=1e-4)  # the reference set itself
    train = evaluate_samples(digits.train_images, digits.train_labels, clf)
    assert train["accuracy"] >= 0.97
    assert train["fd"] == pytest.approx(train["fd_floor"], rel=1e-6)  # floor = real train vs real test
    assert 0 < train["fd_floor"] < 20
    assert set(train["per_class_accuracy"]) == set(range(10))


def test_degraded_digits_score_worse(clf, digits):
    gen = torch.Generator().manual_seed(0)
    x, y = digits.train_images[:400], digits.train_labels[:400]
    clean = evaluate_samples(x, y, clf)
    noisy = evaluate_samples(x + 0.8 * torch.randn(x.shape, generator=gen), y, clf)
    shuffled = evaluate_samples(x, y[torch.randperm(len(y), generator=gen)], clf)
    assert noisy["fd"] > 5 * clean["fd"]
    assert noisy["accuracy"] < clean["accuracy"]
    assert shuffled["accuracy"] < 0.3
    assert shuffled["fd"] == pytest.approx(clean["fd"])  # FD ignores labels


def test_bad_inputs_are_rejected(clf):
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        clf.predict(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="labels must have shape"):
        evaluate_samples(torch.zeros(4, 1, 8, 8), torch.zeros(3), clf)
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        DigitsClassifier.load("/nonexistent/classifier.safetensors")


def test_train_classifier_is_deterministic_under_a_seed(tmp_path):
    cfg = ClassifierTrainConfig(epochs=1)
    a = train_classifier(tmp_path / "a", seed=3, config=cfg)
    b = train_classifier(tmp_path / "b", seed=3, config=cfg)
    train_classifier(tmp_path / "c", seed=4, config=cfg)
    wa, wb, wc = ((tmp_path / d / CLASSIFIER_WEIGHTS).read_bytes() for d in "abc")
    assert wa == wb and wa != wc
    assert a["test_accuracy"] == b["test_accuracy"] and a["seed"] == 3
    assert not list(tmp_path.glob("*/*.tmp"))
    loaded = DigitsClassifier.load(tmp_path / "a" / CLASSIFIER_WEIGHTS, "cpu")
    assert loaded.info["seed"] == 3


def test_shipped_demo_model_meets_its_bar_on_a_small_sample(clf):
    """5 samples per class, 50 rectified-flow steps, batched CFG 3: class accuracy >= 90% (at most 5 of 50
    wrong). The full 1000-sample evaluation is `moeca evaluate-demo` (its numbers are in the model card)."""
    from moeca.models.registry import demo_weights_path, load_model
    from moeca.diffusion.samplers import SamplerConfig, sample

    if not demo_weights_path().is_file():
        pytest.skip(f"demo weights absent at {demo_weights_path()} (run `moeca train-demo`)")
    model = load_model("demo", device="cpu")
    labels = torch.arange(10).repeat_interleave(5)
    cfg = SamplerConfig(kind="rectified_flow", num_steps=50, cfg_scale=3.0, cfg_mode="batched")
    images = sample(model, cfg, labels, seed=123)
    scores = evaluate_samples(images, labels, clf)
    assert scores["accuracy"] >= 0.90, scores
