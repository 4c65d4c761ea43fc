"""CLIP score: agreement between an image and its prompt as the cosine of CLIP image and text embeddings.

Two scales are in use and are easy to confuse, so both are always reported, with the model's name:

* the plain cosine similarity, averaged over images — what DMD2 (Yin et al. 2024, "Improved Distribution Matching
  Distillation for Fast Image Synthesis") and SiD-LSG report with OpenCLIP ViT-g/14 (numbers around 0.30–0.32);
* ``100 · max(cos, 0)`` — the CLIPScore of Hessel et al. 2021 as torchmetrics implements it with an OpenAI CLIP
  (numbers around 30).

:class:`ClipScorer` uses transformers' ``CLIPModel`` from a local folder (``local_files_only=True``) with a PIL
preprocessing of its own (resize the shorter side, centre crop, normalise with the folder's mean/std), so that it
needs no torchvision. :class:`OpenClipScorer` uses ``open_clip`` (optional extra, needs torchvision).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from stepdistill.eval.errors import EVAL_EXTRA_HINT, MetricUnavailable
from stepdistill.eval.fid import quantize_images

__all__ = ["ClipScorer", "OpenClipScorer", "to_pil_images", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_pil_images(images) -> list[Image.Image]:
    """Images as a list of RGB PIL images. Accepts PIL images, or (N, 3, H, W) tensors/arrays: float in [-1, 1]
    (quantised like a saved PNG) or uint8 in [0, 255]."""
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, Image.Image) for im in images):
        return [im.convert("RGB") for im in images]
    arr = quantize_images(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 3, H, W) images, got shape {arr.shape}")
    return [Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))).convert("RGB") for a in arr]


def _features_tensor(output) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features`` return a tensor in transformers 4.x and a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projected embedding in 5.x."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output of type {type(output).__name__}")
    return pooled


class _ClipScoreBase:
    """Shared scoring: subclasses provide normalised image and text embeddings."""

    name: str
    batch_size: int

    def _embed_images_pil(self, images: list[Image.Image]) -> torch.Tensor:  # (B, D), L2-normalised
        raise NotImplementedError

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:  # (B, D), L2-normalised
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        """L2-normalised image embeddings (N, D) as float64 — also what diversity and FD_CLIP use."""
        pil = to_pil_images(images)
        chunks = [self._embed_images_pil(pil[i : i + self.batch_size]) for i in range(0, len(pil), self.batch_size)]
        return torch.cat(chunks).to("cpu", torch.float64).numpy()

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = list(prompts)
        chunks = [self._embed_texts(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(chunks).to("cpu", torch.float64).numpy()

    def cosines(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Per-image cosine similarity with its own prompt, (N,)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        image_emb = self.embed_images(images)
        if len(image_emb) != len(prompts):
            raise ValueError(f"{len(image_emb)} images but {len(prompts)} prompts")
        text_emb = self.embed_texts(prompts)
        return np.sum(image_emb * text_emb, axis=1)

    def score(self, images, prompts: Sequence[str]) -> dict:
        """Mean cosine similarity and mean ``100·max(cos, 0)``, with the model that produced them."""
        cos = self.cosines(images, prompts)
        return {
            "clip_score_cosine": float(np.mean(cos)),
            "clip_score_100": float(np.mean(100.0 * np.maximum(cos, 0.0))),
            "clip_model": self.name,
            "num_images": int(cos.shape[0]),
        }


class ClipScorer(_ClipScoreBase):
    """CLIP score with transformers' ``CLIPModel`` loaded from a local folder (never downloads).

    The folder is a ``save_pretrained`` CLIP checkpoint (config.json + weights, tokenizer files vocab.json /
    merges.txt or tokenizer.json, and optionally preprocessor_config.json; e.g. a copy of openai/clip-vit-large-patch14).
    Images are preprocessed as CLIPImageProcessor does — shorter side resized to ``size`` with the configured PIL
    filter (bicubic), centre crop to ``crop_size``, scale to [0, 1], normalise with ``image_mean``/``image_std``
    (OpenAI CLIP's values when the folder has no preprocessor config) — but with PIL and numpy only.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        name: str | None = None,
    ):
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise MetricUnavailable(
                f"CLIP score: no CLIP model folder at {path} (expected a transformers save_pretrained folder with "
                "config.json, the weights and the tokenizer files, e.g. a local copy of openai/clip-vit-large-patch14 "
                "or openai/clip-vit-base-patch32 from the Hugging Face Hub). Nothing is downloaded: copy the folder "
                "here and pass its path."
            )
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception:  # e.g. a folder with only tokenizer.json and a non-CLIP tokenizer class
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.name = name or path.resolve().name
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._load_preprocessing(path)

    def _load_preprocessing(self, path: Path) -> None:
        image_size = int(self.model.config.vision_config.image_size)
        cfg = {}
        cfg_file = path / "preprocessor_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        size = cfg.get("size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height", image_size))
        crop = cfg.get("crop_size", size)
        if isinstance(crop, dict):
            crop = (int(crop.get("height", image_size)), int(crop.get("width", image_size)))
        else:
            crop = (int(crop), int(crop))
        self.resize_shortest = int(size) if cfg.get("do_resize", True) else None
        self.crop_size = crop if cfg.get("do_center_crop", True) else None
        self.resample = Image.Resampling(int(cfg.get("resample", Image.Resampling.BICUBIC)))
        self.rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        do_norm = cfg.get("do_normalize", True)
        self.mean = np.asarray(cfg.get("image_mean", OPENAI_CLIP_MEAN) if do_norm else (0.0, 0.0, 0.0), np.float32)
        self.std = np.asarray(cfg.get("image_std", OPENAI_CLIP_STD) if do_norm else (1.0, 1.0, 1.0), np.float32)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> pixel_values (B, 3, h, w) for the vision tower."""
        out = []
        for image in images:
            image = image.convert("RGB")
            if self.resize_shortest is not None:
                width, height = image.size
                short, long = (width, height) if width <= height else (height, width)
                new_short, new_long = self.resize_shortest, int(self.resize_shortest * long / short)
                new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
                if (new_w, new_h) != (width, height):
                    image = image.resize((new_w, new_h), resample=self.resample)
            arr = np.asarray(image, dtype=np.float32)
            if self.crop_size is not None:
                crop_h, crop_w = self.crop_size
                h, w = arr.shape[:2]
                if h < crop_h or w < crop_w:  # pad symmetrically with zeros, as the HF processor does
                    padded = np.zeros((max(h, crop_h), max(w, crop_w), 3), np.float32)
                    top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
                    padded[top : top + h, left : left + w] = arr
                    arr, (h, w) = padded, padded.shape[:2]
                top, left = (h - crop_h) // 2, (w - crop_w) // 2
                arr = arr[top : top + crop_h, left : left + crop_w]
            arr = (arr * self.rescale - self.mean) / self.std
            out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
        return torch.stack(out).to(self.device, self.dtype)

    def _embed_images_pil(self, images: list[Image.Image]) -> torch.Tensor:
        feats = _features_tensor(self.model.get_image_features(pixel_values=self.preprocess(images))).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        feats = _features_tensor(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        ).float()
        return feats / feats.norm(dim=-1, keepdim=True)


class OpenClipScorer(_ClipScoreBase):
    """CLIP score with an ``open_clip`` model and a local checkpoint — OpenCLIP ViT-g/14 (LAION-2B) as DMD2 and
    SiD-LSG report. Needs the optional ``open_clip_torch`` package (and torchvision, which it imports)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None,
        model_name: str = "ViT-g-14",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        name: str | None = None,
    ):
        try:
            import open_clip
        except ImportError as err:
            raise MetricUnavailable(
                f"OpenCLIP score needs the optional package open_clip_torch (which needs torchvision): "
                f"{EVAL_EXTRA_HINT} on a machine where torchvision works ({type(err).__name__}: {err})."
            ) from err
        if checkpoint is None or not Path(checkpoint).is_file():
            raise MetricUnavailable(
                f"OpenCLIP score: checkpoint {checkpoint!r} not found. Pass the path of the open_clip weights file for "
                f"{model_name} (for ViT-g/14 LAION-2B, the open_clip_pytorch_model.bin of the Hugging Face repository "
                "laion/CLIP-ViT-g-14-laion2B-s12B-b42K or laion/CLIP-ViT-g-14-laion2B-s34B-b88K); nothing is downloaded."
            )
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint), device=device)
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.name = name or f"open_clip:{model_name}:{Path(checkpoint).name}"

    def _embed_images_pil(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        feats = self.model.encode_image(pixels).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def _embed_texts(self, prompts: list[str]) -> torch.Tensor:
        feats = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        return feats / feats.norm(dim=-1, keepdim=True)
