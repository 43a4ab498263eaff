"""Image and feature-distribution metrics (DESIGN section 5).

Pairwise fidelity of one sample set against another from the same noise and labels (cached vs full
compute): :func:`psnr`, :func:`ssim`, :func:`relative_l2`, each per sample ``[B]``. Distribution
distance of classifier features: :func:`frechet_distance`.

Images are ``[B, C, H, W]`` float tensors; the default ``data_range=2.0`` matches images in [-1, 1].
PSNR and SSIM are computed in torch on the samples' device and pinned against scikit-image in the tests;
the Frechet distance takes its matrix square root from ``scipy.linalg.sqrtm``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

SSIM_WINDOW = 7
"""Gaussian window side of :func:`ssim` (shrunk to the largest odd size that fits smaller images)."""
SSIM_SIGMA = 1.5
"""Standard deviation, in pixels, of the SSIM Gaussian window."""
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: the two image sets must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"{name}: expected a batch [B, ...] of images, got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, max_db: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample in dB: ``10 log10(data_range^2 / mse)`` -> ``[B]`` float32,
    scikit-image's ``peak_signal_noise_ratio`` per sample (pinned to 1e-4 in tests/test_metrics.py).

    a, b: ``[B, ...]`` (any trailing shape). Identical samples have zero error and give ``+inf``;
    pass ``max_db`` (e.g. 100) to cap the result instead, which keeps averages finite.
    """
    _check_pair(a, b, "psnr")
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    diff = a.detach().double() - b.detach().double()
    mse = diff.flatten(1).pow(2).mean(dim=1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> +inf
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out.float()


def relative_l2(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Relative L2 error of ``a`` against the reference ``b`` per sample: ``||a - b|| / ||b||`` -> ``[B]``.

    ``eps`` guards an all-zero reference (the result is then ``||a|| / eps``-sized, i.e. huge, unless
    ``a`` is zero as well, which gives 0).
    """
    _check_pair(a, b, "relative_l2")
    a2, b2 = a.detach().double().flatten(1), b.detach().double().flatten(1)
    return ((a2 - b2).norm(dim=1) / b2.norm(dim=1).clamp_min(eps)).float()


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian ``[size, size]`` float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity per sample (Wang et al. 2004) -> ``[B]`` float32, 1.0 for identical images.

    a, b: ``[B, C, H, W]``. Local statistics use a Gaussian window of side ``window`` (default 7,
    sigma 1.5, which fits the 8x8 digits; it shrinks to the largest odd size <= min(H, W) for smaller
    images) applied per channel without padding ("valid"), with ``K1=0.01, K2=0.03`` and
    ``L=data_range``. The SSIM map is averaged over channels and positions. On 8x8 images the valid
    map is 2x2, so the score weights the image centre more than its border.

    This is scikit-image's ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=data_range)`` whenever ``window`` equals its window
    ``2 * int(3.5 * sigma + 0.5) + 1`` (pinned to 1e-4 in tests/test_metrics.py); it runs on the
    samples' device in float64. The default 7-pixel window truncates the sigma-1.5 Gaussian earlier than
    scikit-image (11 pixels), which could not score 8x8 images at all.
    """
    _check_pair(a, b, "ssim")
    if a.dim() != 4:
        raise ValueError(f"ssim: expected images [B, C, H, W], got shape {tuple(a.shape)}")
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    B, C, H, W = a.shape
    size = min(window, H, W)
    if size % 2 == 0:
        size -= 1
    if size < 1:
        raise ValueError(f"ssim: images of size {H}x{W} are too small")
    kernel = gaussian_window(size, sigma).to(a.device)[None, None].repeat(C, 1, 1, 1)
    x, y = a.detach().double(), b.detach().double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(dim=1).float()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` and ``[M, F]``.

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))`` with unbiased covariances; the matrix
    square root is ``scipy.linalg.sqrtm``. A near-singular product gets a tiny diagonal offset;
    imaginary parts from rounding (< 1e-3 relative) are dropped. The estimate is biased upward for
    small sets, so compare distances computed from sets of similar sizes.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"frechet_distance: features must be 2-D [N, F], got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"frechet_distance: need at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("frechet_distance: features contain NaN or Inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = _sqrtm_product(cov_a, cov_b, linalg)
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def _sqrtm_product(cov_a: np.ndarray, cov_b: np.ndarray, linalg) -> np.ndarray:
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        scale = max(np.abs(covmean).max(), 1e-12)
        if np.abs(covmean.imag).max() / scale > 1e-3:
            raise ValueError("frechet_distance: the covariance square root has a large imaginary part; "
                             "the feature sets are probably too small or degenerate")
        covmean = covmean.real
    return covmean


def mean_finite(values: torch.Tensor | np.ndarray) -> float:
    """Mean of the finite entries (``inf`` PSNR of identical samples is skipped); NaN if none is finite."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else math.nan
