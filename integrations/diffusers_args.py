"""Command-line options of the diffusers family (``moeca trace --diffusers``, ``moeca replay --diffusers``).

Defined apart from :mod:`moeca.integrations.diffusers` so that building moeca's CLI never imports
diffusers (an optional extra): the commands import the integration only when these options are used.
"""
from __future__ import annotations

import argparse

CONFIG_NAMES = ("tiny", "tiny-4e", "bench", "hidream-i1")
"""Named random-weight configs (``moeca.integrations.diffusers.sampling.CONFIGS``)."""


def add_diffusers_arguments(parser: argparse.ArgumentParser) -> None:
    """``--diffusers``, ``--diffusers-config`` and the HiDream sampling options, in their own group."""
    g = parser.add_argument_group("diffusers: HiDream-I1 (needs the extra: pip install \"moeca[diffusers]\")")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--diffusers", metavar="PATH", default=None,
                     help="a local from_pretrained folder of HiDreamImageTransformer2DModel (the transformer's, or "
                          "a pipeline's with transformer/); no hub access")
    src.add_argument("--diffusers-config", metavar="NAME", choices=CONFIG_NAMES, default=None,
                     help=f"random weights of a named config: {', '.join(CONFIG_NAMES)} (tiny = diffusers' own test "
                          "config; hidream-i1 = the real shape, GPU only)")
    g.add_argument("--embeddings", metavar="FILE", default=None,
                   help="text conditioning: .safetensors/.pt with prompt_embeds_t5, prompt_embeds_llama3, "
                        "pooled_prompt_embeds (and negative_*) from pipe.encode_prompt; default: random (named configs)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (latents are 1/8; default: "
                                                            "256 for tiny configs, 1024 otherwise)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    g.add_argument("--flow-shift", type=float, default=3.0, help="sigma shift of the Euler sampler (HiDream-I1-Full: 3.0)")


def wants_diffusers(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "diffusers", None) or getattr(args, "diffusers_config", None))
