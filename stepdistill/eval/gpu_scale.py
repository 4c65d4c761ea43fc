"""The gpu-scale benchmark (eval/README.md): a recipe's training step on an SD1.5-sized pipeline built from the
public SD1.5 component configs with random weights (speed and memory do not depend on the values), in bf16.

It builds the pipeline folder once (UNet 320/640/1280/1280, cross-attention 768; the SD VAE; a CLIP ViT-L/14-sized
text encoder over a 77-token context, with the toy world's closed-vocabulary tokenizer, since no real tokenizer can be
downloaded here), writes a pipeline YAML for it, and measures each variant with :mod:`stepdistill.eval.distill_cost`
(one process per variant, so each peak memory is its own). Usage, on a GPU machine::

    stepdistill gpu-scale --out runs/gpu-scale            # dmd2: +/- gradient checkpointing, +/- LoRA
    stepdistill gpu-scale --recipe training/sid-lsg.yaml --out runs/gpu-scale-sid   # SiD-LSG

Without a CUDA GPU it stops at once with one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stepdistill.core.outputs import write_text_atomic
from stepdistill.eval.distill_cost import DistillCostError, measure_recipe
from stepdistill.eval.report import device_description
from stepdistill.toy.models import SCHEDULER_CONFIG
from stepdistill.toy.tokenizer import build_tokenizer_files

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")

# name -> recipe overrides; each runs training/dmd2.yaml (bf16) with these on top
VARIANTS: dict[str, list[str]] = {
    "full, checkpointing": ["train.gradient_checkpointing=true"],
    "full, no checkpointing": ["train.gradient_checkpointing=false"],
    "LoRA-64, checkpointing": ["train.gradient_checkpointing=true", "generator.lora_rank=64",
                               "objective_config.fake_lora_rank=64", "objective_config.fake_lora_alpha=64"],
    "LoRA-64, no checkpointing": ["train.gradient_checkpointing=false", "generator.lora_rank=64",
                                  "objective_config.fake_lora_rank=64", "objective_config.fake_lora_alpha=64"],
}


def build_sd15_sized_pipeline(out_dir: str | Path, scale: float = 1.0) -> Path:
    """Save a randomly initialised StableDiffusionPipeline with SD1.5's component sizes (``scale`` < 1 shrinks every
    width, for tests) at ``out_dir``; returns the folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def width(c: int) -> int:
        return max(32, int(round(c * scale / 32)) * 32)

    out = Path(out_dir)
    torch.manual_seed(0)
    unet_cfg = {**SD15_UNET, "block_out_channels": tuple(width(c) for c in SD15_UNET["block_out_channels"])}
    vae_cfg = {**SD15_VAE, "block_out_channels": tuple(width(c) for c in SD15_VAE["block_out_channels"])}
    text_dim = width(SD15_TEXT["hidden_size"])
    unet_cfg["cross_attention_dim"] = text_dim
    build_tokenizer_files(out / "tokenizer", max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    text_cfg = CLIPTextConfig(
        **{**SD15_TEXT, "hidden_size": text_dim, "intermediate_size": 4 * text_dim, "projection_dim": text_dim,
           "num_attention_heads": max(1, text_dim // 64)},
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=CLIPTextModel(text_cfg), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_cfg), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def run_gpu_scale(out_dir: str | Path, recipe: str = "training/dmd2.yaml", steps: int = 6, warmup: int = 2,
                  batch_size: int = 8, resolution: int = 512, scale: float = 1.0,
                  variants: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Build the SD1.5-sized pipeline, then measure ``recipe`` (bf16) under each variant; write report.json/md."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "sd15-sized"
    if not (folder / "model_index.json").is_file():
        build_sd15_sized_pipeline(folder, scale)
    pipeline_yaml = out / "pipeline.yaml"
    write_text_atomic(pipeline_yaml, f"teacher: {folder.resolve()}\ndtype: bfloat16\nreal_images: null\n"
                                     f"resolution: {resolution}\n")
    entries = []
    for name, overrides in (variants or VARIANTS).items():
        common = ["train.mixed_precision=bf16", f"train.batch_size={batch_size}"]
        try:
            entry = measure_recipe(pipeline_yaml, recipe, out / "runs" / name.replace(" ", "").replace(",", "_"),
                                   steps, warmup, [*common, *overrides])
        except DistillCostError as err:  # a failed (e.g. out-of-memory) variant is a result too; measure the others
            entry = {"recipe": recipe, "overrides": [*common, *overrides], "error": str(err)[-2000:]}
        entry["variant"] = name
        entries.append(entry)
        write_text_atomic(out / "report.json", json.dumps(
            {"benchmark": "gpu-scale", "device": device_description(), "cuda": torch.cuda.is_available(),
             "batch_size": batch_size, "resolution": resolution, "entries": entries}, indent=2))
        print(json.dumps({k: entry.get(k) for k in ("variant", "steps_per_s", "peak_memory_bytes", "error")}),
              flush=True)
    lines = ["| variant | batch | fake updates / step | steps/s | s/step | peak memory (GiB) |", "|---|---|---|---|---|---|"]
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['variant']} | {batch_size} | — | failed | — | {e['error'].splitlines()[-1][:80]} |")
        else:
            lines.append(f"| {e['variant']} | {e['batch_size']} | {e['aux_updates_per_generator_update']} "
                         f"| {e['steps_per_s']:.3f} | {e['seconds_per_step']:.2f} | {e['peak_memory_bytes'] / 2**30:.1f} |")
    write_text_atomic(out / "report.md", f"# gpu-scale ({recipe}, bf16, {resolution} px)\n\nDevice: "
                      f"{device_description()}\n\n" + "\n".join(lines) + "\n")
    return {"entries": entries}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-scale")
    parser.add_argument("--recipe", default="training/dmd2.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every width (tests only)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a CUDA GPU (tests only: an SD1.5-sized step on a CPU takes hours)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_scale: error: no CUDA GPU is visible (torch.cuda.is_available() is False); this benchmark "
              "measures an SD1.5-sized training step in bf16 and only means something on a GPU. Run it on a GPU "
              "machine (pass --allow-cpu to force it, for tests)", file=sys.stderr)
        return 2
    run_gpu_scale(args.out, args.recipe, args.steps, args.warmup, args.batch_size, args.resolution, args.scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
