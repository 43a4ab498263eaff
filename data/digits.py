"""The real data set of the demo model: scikit-learn's 8x8 handwritten digits (1797 scans, 10 classes).

Pixels 0..16 are mapped to [-1, 1]. The split is fixed (stratified, seed 0): 80% train, 20% test.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """images ``[N, 1, 8, 8]`` float32 in [-1, 1]; labels ``[N]`` int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits_split() -> DigitsSplit:
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                              stratify=labels)
    return DigitsSplit(torch.from_numpy(tr_x), torch.from_numpy(tr_y), torch.from_numpy(te_x), torch.from_numpy(te_y))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8 (values clipped)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()
