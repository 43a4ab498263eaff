"""Properties of the fidelity and distribution metrics (evaluation/metrics.py)."""
import math

import numpy as np
import pytest
import torch

from moeca.evaluation.metrics import frechet_distance, mean_finite, psnr, relative_l2, ssim


def _images(shape=(6, 1, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 2 - 1


def test_psnr_identical_is_inf_and_cap_keeps_it_finite():
    a = _images()
    assert torch.isinf(psnr(a, a)).all() and (psnr(a, a) > 0).all()
    assert torch.equal(psnr(a, a, max_db=100.0), torch.full((6,), 100.0))
    assert math.isnan(mean_finite(psnr(a, a)))  # nothing finite to average
    assert mean_finite(torch.tensor([1.0, math.inf, 3.0])) == 2.0


def test_psnr_matches_hand_computed_value_and_falls_with_noise():
    a = torch.zeros(2, 1, 8, 8)
    b = a + 0.1                               # mse 0.01, range 2 -> 10 log10(4 / 0.01)
    assert psnr(a, b) == pytest.approx(torch.full((2,), 10 * math.log10(400.0)), abs=1e-4)
    x = _images()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen)
    small, large = psnr(x, x + 0.05 * noise), psnr(x, x + 0.5 * noise)
    assert (small > large).all()
    assert psnr(x, x + 0.05 * noise).shape == (6,)


def test_ssim_identical_is_one_for_digits_and_multichannel_images():
    a = _images()
    assert ssim(a, a) == pytest.approx(torch.ones(6), abs=1e-6)
    big = _images((2, 3, 32, 32), seed=3)
    assert ssim(big, big) == pytest.approx(torch.ones(2), abs=1e-6)
    tiny = _images((2, 1, 4, 4), seed=4)      # window shrinks to 3x3
    assert ssim(tiny, tiny) == pytest.approx(torch.ones(2), abs=1e-6)


def test_ssim_decreases_with_noise_and_is_symmetric():
    a = _images((8, 1, 8, 8))
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(a.shape, generator=gen)
    scores = [ssim(a, a + s * noise).mean().item() for s in (0.02, 0.1, 0.3, 1.0)]
    assert all(x > y for x, y in zip(scores, scores[1:])), scores
    assert scores[0] < 1.0
    b = a + 0.2 * noise
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-6)
    unrelated = _images((8, 1, 8, 8), seed=9)
    assert ssim(a, unrelated).abs().mean() < 0.3


def test_relative_l2():
    b = torch.ones(3, 1, 2, 2)
    a = b * 1.1
    assert relative_l2(a, b) == pytest.approx(torch.full((3,), 0.1), abs=1e-6)
    assert torch.equal(relative_l2(b, b), torch.zeros(3))


def test_frechet_distance_identity_shift_and_scale():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean shifted by 1 in every dimension -> exactly F
    assert frechet_distance(a, a + 1.0) == pytest.approx(16.0, rel=1e-6)
    # b = 2a: cov_b = 4 cov_a -> tr(A) + 4 tr(A) - 4 tr(A) = tr(A), plus the mean term
    expected = np.trace(np.cov(a, rowvar=False)) + np.sum(a.mean(0) ** 2)
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_is_symmetric_and_grows_with_difference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) * 1.5 + 0.3
    c = rng.normal(size=(200, 8)) * 3.0 + 1.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, c) > frechet_distance(a, b) > 0


def test_metric_input_errors_are_specific():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ssim(torch.zeros(2, 64), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------- pinned against libraries
def _noisy_pair(shape, seed, noise=0.3):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=gen) * 2 - 1
    return a, (a + noise * torch.randn(shape, generator=gen)).clamp(-1, 1)


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 3, 32, 32)])
def test_psnr_equals_scikit_image(shape):
    from skimage.metrics import peak_signal_noise_ratio
    a, b = _noisy_pair(shape, seed=11)
    want = [peak_signal_noise_ratio(a[i].double().numpy(), b[i].double().numpy(), data_range=2.0)
            for i in range(shape[0])]
    assert psnr(b, a).numpy() == pytest.approx(np.array(want), abs=1e-4)


@pytest.mark.parametrize("shape,sigma", [((5, 1, 8, 8), 0.9), ((3, 3, 32, 32), 1.5), ((2, 3, 16, 24), 1.0)])
def test_ssim_equals_scikit_image_with_its_window(shape, sigma):
    """scikit-image's Gaussian SSIM truncates at 3.5 sigma: window 2 * int(3.5 sigma + 0.5) + 1."""
    from skimage.metrics import structural_similarity
    a, b = _noisy_pair(shape, seed=12)
    window = 2 * int(3.5 * sigma + 0.5) + 1
    want = [structural_similarity(a[i].double().numpy(), b[i].double().numpy(), gaussian_weights=True, sigma=sigma,
                                  use_sample_covariance=False, data_range=2.0, channel_axis=0)
            for i in range(shape[0])]
    assert ssim(a, b, window=window, sigma=sigma).numpy() == pytest.approx(np.array(want), abs=1e-4)


def test_frechet_distance_equals_the_symmetric_eigen_formula():
    """An independent path: tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2), a symmetric PSD root (eigh)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 0.5

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = psd_sqrt(ca)
    cross = np.trace(psd_sqrt(ra @ cb @ ra))
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
