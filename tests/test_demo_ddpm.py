"""The second shipped model, ``demo-ddpm``: DDPM epsilon prediction with learned-range variance."""
import json

import pytest
import torch

from moeca.cli.main import main
from moeca.models.checkpoint import weights_hash
from moeca.models.config import DiTMoEConfig
from moeca.models.dit_moe import DiTMoE
from moeca.evaluation.evaluator import DigitsClassifier, evaluate_samples
from moeca.models.registry import SHIPPED_MODELS, load_model, model_config
from moeca.diffusion.samplers import GuidedDenoiser, SamplerConfig, default_sampler, sample

SHIPPED = SHIPPED_MODELS["demo-ddpm"]


@pytest.fixture(scope="module")
def model():
    return load_model("demo-ddpm", device="cpu")


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_shipped_weights_load_with_the_ddpm_config(model):
    mc = model.config
    assert mc.objective == "ddpm_eps" and mc.learn_sigma and mc.out_channels == 2 * mc.in_channels
    assert mc.fingerprint() == SHIPPED.config.fingerprint()
    # same architecture as the demo model, only the objective and the variance channel differ
    demo = SHIPPED_MODELS["demo"].config
    assert (mc.depth, mc.hidden_size, mc.num_experts, mc.top_k, mc.num_tokens) == (
        demo.depth, demo.hidden_size, demo.num_experts, demo.top_k, demo.num_tokens)
    assert SHIPPED.weights_path.stat().st_size <= 20e6


def test_card_names_the_shipped_weights(model):
    folder = SHIPPED.weights_path.parent
    card = json.loads((folder / "card.json").read_text())
    assert card["model"]["name"] == "demo-ddpm"
    assert card["model"]["weights_hash"] == weights_hash(model)
    assert card["evaluation_config"]["sampler"] == "ddpm"
    assert all(ev["num_samples"] >= 300 for ev in card["evaluations"])
    for name in ("MODEL_CARD.md", "loss_curve.png", "samples.png", "expert_load.png", "training_log.json"):
        assert (folder / name).is_file(), name
    assert "weights_hash" in card["model"] and card["model"]["weights_hash"] in (folder / "MODEL_CARD.md").read_text()


def test_few_step_ddpm_samples_are_recognised_digits(model):
    """Behaviour, not shape: 25 respaced DDPM steps with CFG give digits the shipped classifier reads
    as their class far above chance (10%)."""
    labels = torch.arange(10).repeat_interleave(3)
    cfg = default_sampler(model.config.objective, num_steps=25, cfg_scale=3.0)
    assert cfg.kind == "ddpm"
    images = sample(model, cfg, labels, seed=0)
    assert images.shape == (30, 1, 8, 8) and torch.isfinite(images).all()
    scores = evaluate_samples(images, labels, DigitsClassifier.load_shipped("cpu"))
    assert scores["accuracy"] >= 0.6, scores


def test_learned_variance_channel_is_used_and_not_guided():
    """A 1-channel model guides only its epsilon channel even though the reference guides 3 channels."""
    cfg_model = DiTMoEConfig(**{**SHIPPED.config.to_dict(), "depth": 1, "hidden_size": 16, "num_heads": 2})
    net = DiTMoE(cfg_model)
    denoiser = GuidedDenoiser(net, SamplerConfig(kind="ddpm", num_steps=5, cfg_scale=4.0, cfg_channels=3))
    cond, uncond = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    out = denoiser.guide(cond, uncond)
    assert torch.equal(out[:, 1:], cond[:, 1:])
    assert torch.allclose(out[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]))


def test_reference_sampler_is_250_respaced_ddpm_steps_and_benchmarks_use_50(model):
    cfg = default_sampler(model.config.objective)
    assert (cfg.kind, cfg.num_steps) == ("ddpm", 250)
    assert SHIPPED.bench_steps == 50 and SHIPPED_MODELS["demo"].bench_steps == 50


def test_sample_cli_selects_the_model_by_name(tmp_path, capsys):
    out = tmp_path / "g.png"
    rc, stdout, err = _run(["sample", "--model", "demo-ddpm", "--steps", 3, "--labels", "0,1", "--out", out,
                            "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0, err
    assert "ddpm, 3 steps" in stdout and out.is_file()


def test_registry_names_and_errors():
    assert model_config("demo-ddpm").objective == "ddpm_eps"
    rand = load_model("demo-ddpm", random_init=True, device="cpu")
    assert rand.config.learn_sigma and rand.config.name == "demo-ddpm"
    with pytest.raises(ValueError, match="demo-ddpm"):
        load_model("demo_ddpm", random_init=True, device="cpu")


def test_evaluate_demo_cards_a_ddpm_model_with_its_own_sampler(tmp_path, capsys):
    from moeca.diffusion.train_demo import TrainConfig, train_demo

    tiny = DiTMoEConfig(name="tiny-ddpm", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                        num_heads=2, num_experts=4, top_k=2, num_classes=10, learn_sigma=True, objective="ddpm_eps")
    train_demo(tmp_path, TrainConfig(steps=2, batch_size=16, log_every=1, threads=1), model_config=tiny,
               progress=False, shipped=SHIPPED)
    weights, card_dir = tmp_path / SHIPPED.weights, tmp_path / "card"
    rc, out, err = _run(["evaluate-demo", "--model", "demo-ddpm", "--checkpoint", weights, "--out", card_dir,
                         "--samples-per-class", 2, "--steps", 3, "--chunk", 8, "--device", "cpu", "--no-progress"],
                        capsys)
    assert rc == 0, err
    card = json.loads((card_dir / "card.json").read_text())
    assert card["evaluation_config"]["sampler"] == "ddpm" and card["model"]["name"] == "demo-ddpm"
    assert card["command"].startswith("moeca evaluate-demo --model demo-ddpm")
    md = (card_dir / "MODEL_CARD.md").read_text()
    assert md.startswith("# moeca demo-ddpm model card") and "learned-range variance" in md
    # the rectified-flow demo name refuses these weights rather than sampling them with the wrong sampler
    rc, _, err = _run(["evaluate-demo", "--checkpoint", weights, "--out", card_dir, "--samples-per-class", 1,
                       "--steps", 1, "--device", "cpu", "--no-progress"], capsys)
    assert rc == 2 and "--model" in err


def test_card_says_plainly_when_samples_are_at_chance():
    import copy

    from moeca.evaluation.card import render_markdown

    card = json.loads((SHIPPED.weights_path.parent / "card.json").read_text())
    low, high = copy.deepcopy(card), copy.deepcopy(card)
    for ev in low["evaluations"]:
        ev["accuracy"] = 0.11
    for ev in high["evaluations"]:
        ev["accuracy"] = 0.9
    assert "Not usable for quality measurements" in render_markdown(low)
    assert "Not usable for quality measurements" not in render_markdown(high)
