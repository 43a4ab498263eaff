"""``moeca sample / train-demo / train-classifier / evaluate-demo`` and ``moeca bench full`` mechanics."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from moeca.cli.main import main
from moeca.common.outputs import FILES_SIDECAR
from moeca.models.checkpoint import save_safetensors
from moeca.models.config import DiTMoEConfig
from moeca.models.dit_moe import DiTMoE
from moeca.models.registry import demo_weights_path, randomize_zero_init

# 8x8 single-channel, 10 classes: the digits classifier can score it; tiny enough for CPU tests.
TINY_DIGITS = DiTMoEConfig(name="tiny-digits", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                           num_heads=2, num_experts=4, top_k=2, num_classes=10, learn_sigma=False,
                           objective="rectified_flow")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = DiTMoE(TINY_DIGITS)
    randomize_zero_init(model, 0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_safetensors(model, path)
    return path


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_sample_writes_a_deterministic_grid(tiny_ckpt, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    base = ["sample", "--checkpoint", tiny_ckpt, "--steps", 2, "--num-per-class", 2, "--device", "cpu", "--scale", 1]
    rc, out, _ = _run(base + ["--out", a], capsys)
    assert rc == 0 and "wrote 20 samples" in out
    assert _run(base + ["--out", b], capsys)[0] == 0
    assert _run(base + ["--out", c, "--seed", 1], capsys)[0] == 0
    img_a, img_b, img_c = (np.asarray(Image.open(p)) for p in (a, b, c))
    # 10 rows (classes) x 2 columns of 8x8 images, each over a 16-pixel label strip, with 2-pixel gaps
    assert img_a.shape == (10 * (8 + 16 + 2) + 2, 2 * 10 + 2, 3)
    assert np.array_equal(img_a, img_b) and not np.array_equal(img_a, img_c)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def tiny_ddpm_ckpt(tmp_path_factory):
    """The tiny digits model trained (here: initialised) for the DDPM epsilon objective."""
    from dataclasses import replace
    torch.manual_seed(0)
    model = DiTMoE(replace(TINY_DIGITS, objective="ddpm_eps"))
    randomize_zero_init(model, 0)
    path = tmp_path_factory.mktemp("tiny-ddpm") / "tiny.safetensors"
    save_safetensors(model, path)
    return path


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_accepts_other_samplers_and_labels(tiny_ddpm_ckpt, tmp_path, capsys, sampler):
    out_png = tmp_path / "g.png"
    rc, out, err = _run(["sample", "--checkpoint", tiny_ddpm_ckpt, "--steps", 3, "--labels", "0,9,3", "--sampler",
                         sampler, "--cfg-mode", "separate", "--cfg-scale", 2, "--out", out_png, "--device", "cpu"],
                        capsys)
    assert rc == 0, err
    assert f"{sampler}, 3 steps, CFG 2 (separate)" in out
    assert Image.open(out_png).size == (3 * (8 * 8 + 2) + 2, 8 * 8 + 16 + 2 + 2)  # 64-pixel cells, label strip


@pytest.mark.parametrize("argv, message", [
    (["--model", "Q/9-1E1A", "--random-init"], "unknown model preset 'Q/9-1E1A'"),
    (["--labels", "0,10"], "labels [10] are out of range"),
    (["--labels", "-1"], "labels [-1] are out of range"),
    (["--labels", "one,two"], "comma-separated integers"),
    (["--num-per-class", "0"], "--num-per-class must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_sample_errors_are_specific(tiny_ckpt, tmp_path, capsys, argv, message):
    base = ["sample", "--out", tmp_path / "x.png", "--device", "cpu"]
    if "--model" not in argv:
        base += ["--checkpoint", tiny_ckpt]
    rc, _, err = _run(base + argv, capsys)
    assert rc == 2
    assert err.startswith("moeca sample: error:") and message in err
    assert not (tmp_path / "x.png").exists()


def test_sample_rejects_missing_checkpoint_and_non_png(tiny_ckpt, tmp_path, capsys):
    rc, _, err = _run(["sample", "--checkpoint", tmp_path / "nope.safetensors", "--out", tmp_path / "x.png"], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(["sample", "--checkpoint", tiny_ckpt, "--out", tmp_path / "x.jpg"], capsys)
    assert rc == 2 and ".png" in err
    rc, _, err = _run(["sample", "--model", "S/2-8E2A", "--out", tmp_path / "x.png"], capsys)
    assert rc == 2 and "--random-init" in err and "--checkpoint" in err


def test_sample_shipped_demo_model(tmp_path, capsys):
    if not demo_weights_path().is_file():
        pytest.skip(f"demo weights absent at {demo_weights_path()} (run `moeca train-demo`)")
    rc, out, err = _run(["sample", "--model", "demo", "--steps", 2, "--labels", "0,1", "--out", tmp_path / "d.png",
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "rectified_flow, 2 steps" in out


def test_train_classifier_cli_and_overwrite_guard(tmp_path, capsys):
    rc, out, err = _run(["train-classifier", "--out", tmp_path, "--epochs", 1], capsys)
    assert rc == 0, err
    assert "held-out accuracy" in out and (tmp_path / "classifier.safetensors").is_file()
    rc, _, err = _run(["train-classifier", "--out", tmp_path, "--epochs", 1], capsys)
    assert rc == 2 and "--overwrite" in err


def test_train_demo_cli_writes_weights_and_points_to_evaluate_demo(tmp_path, capsys):
    rc, out, err = _run(["train-demo", "--out", tmp_path, "--steps", 1, "--threads", 1], capsys)
    assert rc == 0, err
    assert (tmp_path / "demo_model.safetensors").is_file() and (tmp_path / "training_log.json").is_file()
    assert "moeca evaluate-demo" in out
    rc, _, err = _run(["train-demo", "--out", tmp_path, "--steps", 1], capsys)
    assert rc == 2 and "--overwrite" in err


def test_evaluate_demo_writes_a_complete_card(tmp_path, capsys):
    from moeca.diffusion.train_demo import TrainConfig, train_demo

    train_demo(tmp_path, TrainConfig(steps=2, batch_size=16, log_every=1, threads=1), model_config=TINY_DIGITS,
               progress=False)
    card_dir = tmp_path / "card"
    rc, out, err = _run(["evaluate-demo", "--checkpoint", tmp_path / "demo_model.safetensors", "--out", card_dir,
                         "--samples-per-class", 3, "--steps", 2, "--chunk", 16, "--device", "cpu", "--no-progress"],
                        capsys)
    assert rc == 0, err
    assert "CFG 3: class accuracy" in out and "CFG 1.5: class accuracy" in out
    names = {p.name for p in card_dir.iterdir()}
    assert {"MODEL_CARD.md", "card.json", "loss_curve.png", "samples.png", "expert_load.png"} <= names
    assert not [n for n in names if n.endswith(".tmp") or (n.startswith(".") and n != FILES_SIDECAR)]
    card = json.loads((card_dir / "card.json").read_text())
    assert [e["cfg_scale"] for e in card["evaluations"]] == [3.0, 1.5]
    for ev in card["evaluations"]:
        assert ev["num_samples"] == 30 and 0 <= ev["accuracy"] <= 1 and ev["fd"] > 0
        assert ev["meets_bar"] == (ev["accuracy"] >= ev["bar"])
    rt = card["routing"]
    assert len(rt["load"]) == TINY_DIGITS.depth
    for row in rt["load"]:
        assert len(row) == TINY_DIGITS.num_experts and sum(row) == pytest.approx(1.0)
    # every step routes 2 * 30 rows (batched CFG) x 16 tokens through each block
    assert rt["routed_rows_per_block"] == 2 * 2 * 30 * TINY_DIGITS.num_tokens
    assert 1.0 >= rt["mean_top1"] >= rt["mean_top2"] > 0
    md = (card_dir / "MODEL_CARD.md").read_text()
    assert "Router sharpness" in md and "FD floor" in md and "![samples](samples.png)" in md
    assert Image.open(card_dir / "samples.png").size[1] == 10 * (8 * 4 + 2) + 2  # one row per class


def test_evaluate_demo_missing_log_is_explained(tiny_ckpt, capsys):
    rc, _, err = _run(["evaluate-demo", "--checkpoint", tiny_ckpt, "--steps", 1, "--samples-per-class", 1], capsys)
    assert rc == 2 and "training log not found" in err


def test_routing_stats_runtime_observes_without_changing_outputs():
    from moeca.evaluation.card import RoutingStatsRuntime
    from moeca.models.runtime import ForwardContext

    torch.manual_seed(0)
    model = DiTMoE(TINY_DIGITS).eval()
    randomize_zero_init(model, 0)
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.tensor([0, 1, 10, 10])
    ref = model(x, t, y)
    stats = RoutingStatsRuntime()
    with model.use_runtime(stats):
        out = model(x, t, y, ForwardContext(0, 1, "batched"))
        stats.reset()  # samplers call reset() around runs; statistics survive it
    assert torch.equal(out, ref)
    s = stats.summary()
    assert s["routed_rows_per_block"] == 4 * TINY_DIGITS.num_tokens
    counts = stats.counts[0]
    assert counts.sum().item() == 4 * TINY_DIGITS.num_tokens * TINY_DIGITS.top_k
    cond = RoutingStatsRuntime(cond_only=True)
    with model.use_runtime(cond):
        model(x, t, y, ForwardContext(0, 1, "batched"))
    assert cond.summary()["routed_rows_per_block"] == 2 * TINY_DIGITS.num_tokens


def test_bench_full_measure_reports_consistent_shares():
    from moeca.bench.full import TimingRuntime, measure

    torch.manual_seed(0)
    model = DiTMoE(TINY_DIGITS).eval()
    randomize_zero_init(model, 0)
    row = measure(model, batch=2, repeats=2)
    assert row["rows_per_call"] == 4 and row["ms_per_step"] > 0
    parts = [row[k] for k in ("pct_routed_experts", "pct_shared_expert", "pct_attention", "pct_router", "pct_other")]
    assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(100.0, abs=1e-6)
    assert row["pct_routed_experts"] > 0 and row["pct_attention"] > 0
    timer = TimingRuntime()
    with model.use_runtime(timer):
        model(torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([1, 2]))
    assert set(timer.totals) == {"attention", "route", "routed_experts", "shared_expert"}


def test_bench_full_cli_validates_arguments(capsys):
    rc, _, err = _run(["bench", "full", "--repeats", 0], capsys)
    assert rc == 2 and "--repeats must be >= 1" in err
    rc, _, err = _run(["bench", "full", "--batch-sizes", "two"], capsys)
    assert rc == 2 and "--batch-sizes" in err
