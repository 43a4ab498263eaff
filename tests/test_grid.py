"""Viewable sample grids (evaluation/grid.py) and where they are written: moeca sample, the replay outputs,
the explorer's Replay page."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moeca.evaluation.grid import CELL_PIXELS, LABEL_PIXELS, auto_scale, label_grid, to_rgb_uint8


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=gen) * 2 - 1


def test_auto_scale_brings_cells_to_64_pixels():
    assert auto_scale(8) == 8 and auto_scale(4) == 16 and auto_scale(32) == 2
    assert auto_scale(256) == 1 and auto_scale(100) == 1
    with pytest.raises(ValueError, match="image size"):
        auto_scale(0)


def test_digits_are_upscaled_by_nearest_neighbour_with_a_caption_strip():
    images = _digits(5)
    grid = label_grid(images, [0, 1, 2, 3, 4], columns=3, pad=2)
    cell = CELL_PIXELS
    assert grid.dtype == np.uint8 and grid.shape == (2 * (cell + LABEL_PIXELS + 2) + 2, 3 * (cell + 2) + 2, 3)
    rgb = to_rgb_uint8(images)
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 2 + r * (cell + LABEL_PIXELS + 2), 2 + c * (cell + 2)
        block = grid[top:top + cell, left:left + cell]
        # every source pixel becomes an 8x8 block of the same value, grey replicated to RGB
        assert np.array_equal(block, rgb[i].repeat(8, axis=0).repeat(8, axis=1))
        strip = grid[top + cell:top + cell + LABEL_PIXELS, left:left + cell]
        assert strip.min() < 100 and strip.max() == 255            # dark text on white
    # the sixth cell is empty: white, no caption
    assert (grid[2 + cell + LABEL_PIXELS + 2:, 2 + 2 * (cell + 2):] == 255).all()


def test_captions_show_the_label_and_class_names():
    images = _digits(2)
    a = label_grid(images, [1, 1], columns=2)
    b = label_grid(images, [1, 7], columns=2)
    cell = CELL_PIXELS
    strip = slice(2 + cell, 2 + cell + LABEL_PIXELS)
    first, second = slice(2, 2 + cell), slice(4 + cell, 4 + 2 * cell)
    assert np.array_equal(a[strip, first], b[strip, first]) and not np.array_equal(a[strip, second], b[strip, second])
    named = label_grid(images, [0, 1], columns=2, class_names=["zero", "a very long class name indeed"])
    assert not np.array_equal(named[strip], label_grid(images, [0, 1], columns=2)[strip])
    plain = label_grid(images, None, columns=2)
    assert plain.shape == (cell + 4, 2 * cell + 6, 3)


def test_channels_and_bad_input():
    rgb = torch.zeros(1, 3, 4, 4)
    rgb[:, 0] = 1.0
    assert (to_rgb_uint8(rgb)[0, ..., 0] == 255).all() and (to_rgb_uint8(rgb)[0, ..., 1] == 128).all()
    latents = torch.zeros(2, 4, 4, 4)
    assert to_rgb_uint8(latents).shape == (2, 4, 4, 3)
    assert to_rgb_uint8(np.zeros((1, 2, 4, 4), np.float32)).shape == (1, 4, 4, 3)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        label_grid(_digits(3), [0, 1])
    with pytest.raises(ValueError, match="columns must be >= 1"):
        label_grid(_digits(3), columns=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        label_grid(torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="label 5 has no entry in class_names"):
        label_grid(_digits(1), [5], class_names=["a", "b"])
    assert label_grid(_digits(2), columns=2, scale=1).shape == (12, 22, 3)


def test_moeca_sample_writes_a_labelled_64_pixel_grid(tmp_path):
    from moeca.cli.main import main
    from conftest import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")            # 4x4 images -> 16x upscale
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--steps", "2", "--labels", "0,1,2", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (CELL_PIXELS + LABEL_PIXELS + 4, 3 * (CELL_PIXELS + 2) + 2, 3)


def test_replay_outputs_and_the_explorer_show_labelled_grids(tmp_path):
    from moeca.app import replay_run
    from moeca.models.checkpoint import weights_hash
    from moeca.diffusion.samplers import SamplerConfig
    from moeca.policy.schedule import full_schedule
    from moeca.replay.driver import replay_compare, write_replay_outputs
    from conftest import make_tiny, TINY

    model = make_tiny(seed=0)
    sampler = SamplerConfig(kind="rectified_flow", num_steps=2, cfg_scale=1.0)
    schedule = full_schedule(TINY, sampler, weights_hash(model))
    result = replay_compare(model, schedule, sampler, [0, 1, 2, 0], repeats=1, progress=False, warmup=False)
    paths = write_replay_outputs(result, tmp_path / "replay")
    for key in ("full_png", "cached_png"):
        picture = np.asarray(Image.open(paths[key]).convert("RGB"))
        assert picture.shape == (CELL_PIXELS + LABEL_PIXELS + 4, 4 * (CELL_PIXELS + 2) + 2, 3)
    page = replay_run.grid(result.full.numpy(), result.labels.numpy(), columns=4)
    assert page.shape == picture.shape
