"""Viewable sample grids: images upscaled (nearest) to a readable cell size, each with its label below.

One job: turn a batch of samples ``[N, C, H, W]`` in [-1, 1] into one uint8 RGB picture. Used by
``moeca sample``, the replay outputs (``full.png``, ``cached.png``) and the explorer's Replay page.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from moeca.data.digits import to_uint8

CELL_PIXELS = 64
"""Default side of one grid cell in pixels: the 8x8 digits are upscaled 8x, 32x32 latents 2x."""
LABEL_PIXELS = 16
"""Height of the caption strip under each image, in pixels."""


def auto_scale(size: int, cell: int = CELL_PIXELS) -> int:
    """Integer nearest-neighbour factor that brings an image side of ``size`` pixels closest to ``cell``
    without going above it (at least 1)."""
    if size < 1:
        raise ValueError(f"image size must be >= 1 pixel, got {size}")
    return max(1, cell // size)


def to_rgb_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8. One channel is shown as grey, three as RGB;
    other channel counts (raw latents) show their first three channels (two: the first repeated)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"a sample grid needs a non-empty batch [N, C, H, W], got shape {tuple(images.shape)}")
    arr = to_uint8(images)
    C = arr.shape[-1]
    if C == 1:
        return np.repeat(arr, 3, axis=-1)
    if C >= 3:
        return np.ascontiguousarray(arr[..., :3])
    return np.concatenate([arr, arr[..., :1]], axis=-1)


def label_grid(images: torch.Tensor | np.ndarray, labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
               *, columns: int = 8, scale: int | None = None, class_names: Sequence[str] | None = None,
               pad: int = 2) -> np.ndarray:
    """A grid of ``images`` ``[N, C, H, W]`` (in [-1, 1]) with ``columns`` images per row -> uint8 ``[h, w, 3]``.

    Each image is upscaled ``scale`` x by nearest neighbour (None: :func:`auto_scale`, 8x8 -> 64x64) and,
    when ``labels`` ``[N]`` are given, captioned underneath with its class name (``class_names[label]``,
    default the label number) in a strip of :data:`LABEL_PIXELS` pixels. White background, ``pad``
    pixels between cells.
    """
    arr = to_rgb_uint8(images)
    n, h, w, _ = arr.shape
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    scale = auto_scale(max(h, w)) if scale is None else scale
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    captions = None
    if labels is not None:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        labels = [int(v) for v in np.asarray(labels).reshape(-1)]
        if len(labels) != n:
            raise ValueError(f"label_grid: {len(labels)} labels for {n} images; give one label per image")
        captions = [_caption(v, class_names) for v in labels]
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    ch, cw = h * scale, w * scale
    strip = LABEL_PIXELS if captions else 0
    ncol = min(columns, n)
    rows = -(-n // ncol)
    cell_h = ch + strip
    grid = np.full((rows * (cell_h + pad) + pad, ncol * (cw + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (cell_h + pad), pad + c * (cw + pad)
        grid[top:top + ch, left:left + cw] = arr[i]
    if captions:
        _draw_captions(grid, captions, ncol, cell_h, cw, ch, pad)
    return grid


def _caption(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is None:
        return str(label)
    if not 0 <= label < len(class_names):
        raise ValueError(f"label {label} has no entry in class_names ({len(class_names)} names)")
    return str(class_names[label])


def _draw_captions(grid: np.ndarray, captions: list[str], ncol: int, cell_h: int, cw: int, ch: int,
                   pad: int) -> None:
    """Write each caption centred in the strip under its image (in place)."""
    font = ImageFont.load_default(size=LABEL_PIXELS - 4)
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(captions):
        r, c = divmod(i, ncol)
        x = pad + c * (cw + pad) + cw / 2
        y = pad + r * (cell_h + pad) + ch + LABEL_PIXELS / 2
        draw.text((x, y), _fit(draw, text, font, cw), fill=(0, 0, 0), font=font, anchor="mm")
    grid[...] = np.asarray(img)


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."

