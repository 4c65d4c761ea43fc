"""Human Preference Score v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating
Human Preferences of Text-to-Image Synthesis"; github.com/tgxs002/HPSv2).

HPS is an OpenCLIP ViT-H/14 fine-tuned on human preference pairs; the score of an image is the cosine of its image
and prompt embeddings. The benchmark has four styles (anime, concept-art, paintings, photo) of 800 prompts each and
reports, per style, 100 × the mean score, and overall the mean of the four (SNOOPI's 31.08 is on this scale, v2.1).

Optional: needs the ``hpsv2`` package (which brings its own open_clip fork and needs torchvision) and a local
checkpoint (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``). Unlike ``hpsv2.score`` /
``hpsv2.benchmark_prompts``, nothing here downloads: the model is built without pretrained weights and the
checkpoint loaded from the given path; prompts are read from files already on disk.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from stepdistill.eval.clip_score import to_pil_images
from stepdistill.eval.errors import EVAL_EXTRA_HINT, MetricUnavailable

__all__ = ["HPS_STYLES", "HPS_CHECKPOINT_NAMES", "HPS_CHECKPOINT_ENV_VAR", "HPSv2Scorer", "benchmark_prompts"]

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
HPS_CHECKPOINT_NAMES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
HPS_CHECKPOINT_ENV_VAR = "STEPDISTILL_HPS_CHECKPOINT"


def _import_hpsv2():
    try:
        import hpsv2
    except ImportError as err:
        raise MetricUnavailable(
            "HPSv2 needs the optional package hpsv2 (with its open_clip fork, which needs torchvision): "
            f"{EVAL_EXTRA_HINT} on a machine where torchvision works ({type(err).__name__}: {err})."
        ) from err
    return hpsv2


def _normalise_version(version: str | float) -> str:
    v = str(version).lower().lstrip("v")
    if v in ("2", "2.0"):
        return "2.0"
    if v == "2.1":
        return "2.1"
    raise ValueError(f"unknown HPS version {version!r}; use '2.0' or '2.1'")


def _hps_root() -> Path:
    """Where the hpsv2 package keeps its files: ``$HPS_ROOT`` or ``~/.cache/hpsv2``."""
    return Path(os.environ.get("HPS_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "hpsv2"))


def benchmark_prompts(prompts_dir: str | os.PathLike | None = None, styles: Sequence[str] = HPS_STYLES) -> dict[str, list[str]]:
    """The HPSv2 benchmark prompts, ``{style: [prompt, ...]}`` for anime, concept-art, paintings and photo.

    With ``prompts_dir``, read ``<style>.json`` (a JSON list of prompts) from it. Otherwise the ``hpsv2`` package
    must be installed and the files are looked for in the package and in its data folder
    (``$HPS_ROOT/datasets/benchmark``, default ``~/.cache/hpsv2/datasets/benchmark``), where ``hpsv2`` stores them
    after fetching them from the Hugging Face dataset zhwang/HPDv2 (folder ``benchmark/``). Never downloads."""
    if prompts_dir is not None:
        folders = [Path(prompts_dir)]
    else:
        hpsv2 = _import_hpsv2()
        package = Path(hpsv2.__file__).parent
        folders = [package / "benchmark", package / "datasets" / "benchmark", package / "assets" / "benchmark",
                   package / "assets", _hps_root() / "datasets" / "benchmark"]
    for folder in folders:
        files = {style: folder / f"{style}.json" for style in styles}
        if all(f.is_file() for f in files.values()):
            prompts = {}
            for style, f in files.items():
                data = json.loads(f.read_text(encoding="utf-8"))
                if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                    raise ValueError(f"{f}: expected a JSON list of prompt strings")
                prompts[style] = data
            return prompts
    names = ", ".join(f"{s}.json" for s in styles)
    raise MetricUnavailable(
        f"HPSv2 benchmark prompts not found (looked for {names} in {', '.join(str(f) for f in folders)}). The hpsv2 "
        "package fetches them from the Hugging Face dataset zhwang/HPDv2 (folder benchmark/) into "
        f"{_hps_root() / 'datasets' / 'benchmark'}; copy the four files there or pass prompts_dir."
    )


class HPSv2Scorer:
    """HPSv2 / HPSv2.1 scores with a local checkpoint.

    ``checkpoint`` is ``HPS_v2.1_compressed.pt`` (version "2.1") or ``HPS_v2_compressed.pt`` (version "2.0"), both
    published in the Hugging Face repository xswu/HPSv2; it may also come from ``$STEPDISTILL_HPS_CHECKPOINT``.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, version: str = "2.1",
                 device: str | torch.device = "cpu", batch_size: int = 16):
        self.version = _normalise_version(version)
        _import_hpsv2()
        try:
            from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        except ImportError as err:
            raise MetricUnavailable(
                f"the installed hpsv2 package has no open_clip fork (hpsv2.src.open_clip): {err}. {EVAL_EXTRA_HINT}"
            ) from err
        if checkpoint is None:
            checkpoint = os.environ.get(HPS_CHECKPOINT_ENV_VAR) or None
        if checkpoint is None or not Path(checkpoint).is_file():
            raise MetricUnavailable(
                f"HPSv{self.version} checkpoint {checkpoint!r} not found. Pass the path of "
                f"'{HPS_CHECKPOINT_NAMES[self.version]}' (Hugging Face repository xswu/HPSv2) as the checkpoint "
                f"argument or set {HPS_CHECKPOINT_ENV_VAR}; nothing is downloaded."
            )
        # Build the ViT-H/14 without pretrained weights (hpsv2 itself would download the LAION weights here),
        # then load the full fine-tuned state dict from the checkpoint.
        model, _, preprocess_val = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False,
        )
        try:
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        except Exception:  # older checkpoints pickle more than tensors; the user chose this file
            warnings.warn(f"{checkpoint}: not loadable with weights_only=True; loading it as a full pickle",
                          RuntimeWarning, stacklevel=2)
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.preprocess = preprocess_val
        self.tokenizer = get_tokenizer("ViT-H-14")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.checkpoint = str(checkpoint)

    @torch.no_grad()
    def cosines(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Per-image HPS (cosine of the normalised image and prompt embeddings), (N,)."""
        pil = to_pil_images(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(pil) != len(prompts):
            raise ValueError(f"{len(pil)} images but {len(prompts)} prompts")
        out = []
        for i in range(0, len(pil), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in pil[i : i + self.batch_size]]).to(self.device)
            text = self.tokenizer(prompts[i : i + self.batch_size]).to(self.device)
            img = self.model.encode_image(pixels).float()
            txt = self.model.encode_text(text).float()
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append((img * txt).sum(dim=-1).cpu())
        return torch.cat(out).double().numpy()

    def score(self, images, prompts: Sequence[str]) -> dict:
        cos = self.cosines(images, prompts)
        return {"hps_cosine": float(cos.mean()), "hps_100": float(100.0 * cos.mean()),
                "hps_version": self.version, "num_images": int(cos.shape[0])}

    def score_styles(self, samples: Mapping[str, tuple]) -> dict:
        """``samples``: ``{style: (images, prompts)}``. Returns 100 × mean HPS per style and overall (the mean of
        the style means, as the HPSv2 benchmark reports), with the version."""
        per_style, counts = {}, {}
        for style, (images, prompts) in samples.items():
            cos = self.cosines(images, prompts)
            per_style[style] = float(100.0 * cos.mean())
            counts[style] = int(cos.shape[0])
        if not per_style:
            raise ValueError("no styles to score")
        return {"hps_version": self.version, "scale": "100*cos", "per_style": per_style,
                "overall": float(np.mean(list(per_style.values()))), "num_images": counts}

    def score_benchmark(self, generate_fn: Callable[[list[str]], object], prompts: Mapping[str, list[str]] | None = None,
                        max_prompts_per_style: int | None = None, batch_size: int = 8) -> dict:
        """Generate images for the benchmark prompts (``generate_fn(prompts) -> images``, batch by batch) and score
        them per style. ``prompts`` defaults to :func:`benchmark_prompts`."""
        prompts = dict(prompts) if prompts is not None else benchmark_prompts()
        samples = {}
        for style, style_prompts in prompts.items():
            style_prompts = list(style_prompts)[:max_prompts_per_style] if max_prompts_per_style else list(style_prompts)
            images = []
            for i in range(0, len(style_prompts), batch_size):
                images.extend(to_pil_images(generate_fn(style_prompts[i : i + batch_size])))
            samples[style] = (images, style_prompts)
        return self.score_styles(samples)
