"""The gpu-scale benchmark's SD1.5-sized pipeline builder (the measurement itself needs a GPU; see eval/README.md)."""

import json

from stepdistill.eval.gpu_scale import SD15_UNET, VARIANTS, build_sd15_sized_pipeline


def test_sd15_sized_builder_makes_a_loadable_pipeline_with_sd15_layout(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = build_sd15_sized_pipeline(tmp_path / "p", scale=0.1)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == list(SD15_UNET["down_block_types"])
    assert unet["layers_per_block"] == 2 and unet["sample_size"] == 64
    assert list(unet["block_out_channels"]) == [32, 64, 128, 128]  # 0.1 x (320, 640, 1280, 1280), rounded to 32
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.hidden_size == unet["cross_attention_dim"]
    assert pipe.vae.config.scaling_factor == 0.18215


def test_variants_cover_checkpointing_and_lora_both_ways():
    flags = {(("train.gradient_checkpointing=true" in v), any(o.startswith("generator.lora_rank") for o in v))
             for v in VARIANTS.values()}
    assert flags == {(True, False), (False, False), (True, True), (False, True)}
