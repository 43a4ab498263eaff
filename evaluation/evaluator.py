"""The digits evaluator: a compact CNN trained by the project on the real 8x8 digits (shipped in
``data/classifier``), used to score generated samples (DESIGN section 5).

- class accuracy of generated samples (does a sample of class ``y`` look like a ``y``?);
- Frechet distance of the classifier's penultimate features of the samples to those of the held-out
  real test digits, reported beside the real-train vs real-test distance (the floor: what two real
  sets of digits score).

Images are ``[B, 1, 8, 8]`` float in [-1, 1] (values outside are clipped, as when saving a PNG).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from moeca.common.outputs import atomic_file, atomic_write_text
from moeca.data.digits import load_digits_split
from moeca.evaluation.metrics import frechet_distance
from moeca.models.registry import data_dir, pick_device

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CARD = "classifier.json"
FEATURE_DIM = 64


def shipped_dir() -> Path:
    return data_dir() / "classifier"


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers (32, 64, 128 channels, two 2x2 max-pools) -> 512 -> ``FEATURE_DIM`` -> 10.

    ``forward(x [B, 1, 8, 8]) -> logits [B, 10]``; ``embed(x) -> [B, FEATURE_DIM]`` are the
    penultimate pre-activation features used for the Frechet distance.
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc(self.dropout(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.embed(x))))


class DigitsClassifier:
    """A trained :class:`DigitsCNN` in eval mode, with the real-digit reference features cached.

    ``predict(images [B,1,8,8]) -> labels [B]`` (int64, CPU); ``features(images) -> np.ndarray
    [B, FEATURE_DIM]`` (float64). Inputs are clipped to [-1, 1] and processed in chunks.
    """

    def __init__(self, net: DigitsCNN, device: torch.device | str | None = None, info: dict | None = None):
        self.device = device if isinstance(device, torch.device) else pick_device(device or "auto")
        self.net = net.to(self.device).eval()
        self.info = info or {}
        self._real: dict[str, np.ndarray] = {}
        self._floor: float | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> "DigitsClassifier":
        """Load classifier weights written by :func:`train_classifier` (a ``.safetensors`` file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier weights not found at {path}; run `moeca train-classifier` to "
                                    "rebuild them")
        net = DigitsCNN()
        state = load_file(str(path))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a moeca digits classifier: missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(unexpected)}; rebuild it with `moeca train-classifier`")
        card = path.with_name(CLASSIFIER_CARD)
        info = json.loads(card.read_text()) if card.is_file() else {}
        return cls(net, device, info)

    @classmethod
    def load_shipped(cls, device: torch.device | str | None = None) -> "DigitsClassifier":
        """The classifier shipped in ``moeca.data/classifier``."""
        return cls.load(shipped_dir() / CLASSIFIER_WEIGHTS, device)

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits classifier expects images [B, 1, 8, 8] in [-1, 1], got shape "
                             f"{tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values; the sampler diverged")
        return images.detach().float().clamp(-1, 1)

    @torch.no_grad()
    def _run(self, images: torch.Tensor, fn, chunk: int = 1024) -> torch.Tensor:
        x = self._prep(images)
        outs = [fn(x[i:i + chunk].to(self.device)).cpu() for i in range(0, x.shape[0], chunk)]
        return torch.cat(outs) if outs else torch.empty(0)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8]`` -> logits ``[B, 10]`` float32 (CPU)."""
        return self._run(images, self.net)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8]`` -> predicted class ``[B]`` int64 (CPU)."""
        return self.logits(images).argmax(dim=1)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """``[B, 1, 8, 8]`` -> penultimate features ``[B, FEATURE_DIM]`` float64."""
        return self._run(images, self.net.embed).double().numpy()

    def real_features(self, split: str) -> np.ndarray:
        """Features of the real ``train`` or ``test`` digits (cached)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._real:
            data = load_digits_split()
            self._real[split] = self.features(data.train_images if split == "train" else data.test_images)
        return self._real[split]

    def fd_floor(self) -> float:
        """Frechet distance of real train digits to real test digits (what real data scores)."""
        if self._floor is None:
            self._floor = frechet_distance(self.real_features("train"), self.real_features("test"))
        return self._floor


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Training of the evaluator: AdamW with a cosine schedule, +-1 pixel shift augmentation."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    seed: int = 0
    threads: int = 1


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Randomly translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    out = torch.empty_like(x)
    for i in range(B):
        out[i] = pad[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W]
    return out


def train_classifier(out_dir: str | os.PathLike, seed: int = 0, config: ClassifierTrainConfig | None = None,
                     progress: bool = False) -> dict:
    """Train the evaluator on the real train split, write ``classifier.safetensors`` and
    ``classifier.json`` (held-out accuracy, seed, seconds, FD floor) atomically into ``out_dir``.

    Deterministic under ``seed`` (fixed thread count). Returns the card dict.
    """
    cfg = replace(config or ClassifierTrainConfig(), seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        data = load_digits_split()
        x, y = data.train_images, data.train_labels
        net = DigitsCNN()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        start = time.time()
        step = 0
        for _ in tqdm(range(cfg.epochs), desc="train-classifier", disable=not progress):
            net.train()
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(net(_shift(x[idx], gen, cfg.max_shift)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        seconds = time.time() - start
        net.eval()
        clf = DigitsClassifier(net, "cpu")
        test_acc = float((clf.predict(data.test_images) == data.test_labels).float().mean())
        train_acc = float((clf.predict(data.train_images) == data.train_labels).float().mean())
        card = {"architecture": "DigitsCNN conv32-conv64-pool-conv128-pool-fc64-fc10",
                "feature_dim": FEATURE_DIM, "train_config": asdict(cfg), "seed": cfg.seed,
                "train_seconds": round(seconds, 2), "threads": cfg.threads, "torch": torch.__version__,
                "train_size": len(x), "test_size": len(data.test_labels),
                "train_accuracy": train_acc, "test_accuracy": test_acc,
                "fd_floor_train_vs_test": clf.fd_floor(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    finally:
        torch.set_num_threads(prev_threads)
    with atomic_file(out_dir / CLASSIFIER_WEIGHTS, "classifier weights") as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"moeca_classifier": json.dumps({"seed": cfg.seed, "test_accuracy": test_acc})})
    atomic_write_text(out_dir / CLASSIFIER_CARD, json.dumps(card, indent=1) + "\n", what="classifier card")
    return card


def evaluate_samples(images: torch.Tensor, labels: torch.Tensor,
                     classifier: DigitsClassifier | None = None) -> dict:
    """Score generated digits ``images [N, 1, 8, 8]`` (in [-1, 1]) meant to show ``labels [N]``.

    Returns ``accuracy`` (fraction classified as their label), ``fd`` (Frechet distance of classifier
    features to the real held-out test digits), ``fd_floor`` (real train vs real test), ``num_samples``
    and ``per_class_accuracy`` (class -> accuracy, for classes present). Needs N >= 2.
    """
    clf = classifier or DigitsClassifier.load_shipped("cpu")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}] to match the images, got "
                         f"{tuple(labels.shape)}")
    pred = clf.predict(images)
    correct = (pred == labels).float()
    per_class = {int(c): float(correct[labels == c].mean()) for c in torch.unique(labels)}
    return {"accuracy": float(correct.mean()), "fd": frechet_distance(clf.features(images), clf.real_features("test")),
            "fd_floor": clf.fd_floor(), "num_samples": int(images.shape[0]), "per_class_accuracy": per_class}
