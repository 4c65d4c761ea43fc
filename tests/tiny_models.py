"""Tiny, randomly initialised Stable Diffusion pipelines for tests (built from configs; nothing is downloaded).

``make_tiny_sd_pipeline`` is SD1.x-like (epsilon) or SD2-like (``prediction_type="v_prediction"``, linear
projections); ``make_tiny_sdxl_pipeline`` is SDXL-like (two text encoders, ``text_time`` added conditioning).
Latents are 4×8×8, images 3×16×16 (VAE scale factor 2). ``sd_pipeline_to_single_file`` writes an SD1-like pipeline
as one original-layout (LDM / CompVis key names) ``.safetensors`` checkpoint for ``from_single_file`` tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

TEXT_HIDDEN = 32
TEXT_VOCAB_SIZE = 1000
MAX_LENGTH = 77
SAMPLE_SIZE = 8  # latent side; the VAE has two blocks, so images are 16×16
WORDS = ("a", "red", "blue", "green", "small", "large", "circle", "square", "triangle", "on", "background")
# Stable Diffusion's noise schedule (the tiny pipelines' schedulers add SD's steps_offset)
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_SCHEDULER = dict(**SD_BETAS, steps_offset=1)


# --- tokenizer ---------------------------------------------------------------------------------------------------
def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (printable ASCII / Latin-1 map to
    themselves, the other bytes to code points from 256 upwards)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def make_tiny_tokenizer(directory: str | Path | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is the byte alphabet (plain and ``</w>`` word-final), a handful of
    whole words and the two special tokens; written as vocab.json + merges.txt and loaded back."""
    import tempfile

    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    for ch in _byte_alphabet():
        vocab[ch + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in WORDS:
        if len(word) < 2:
            continue
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{prefix} {piece}")
            prefix = prefix + piece
            if prefix not in vocab:
                vocab[prefix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) < TEXT_VOCAB_SIZE

    def write_and_load(folder: Path) -> CLIPTokenizer:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n"
        (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, local_files_only=True)

    if directory is not None:
        return write_and_load(Path(directory))
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        return write_and_load(Path(tmp))


def _text_config(tokenizer: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=TEXT_VOCAB_SIZE,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae(**config) -> AutoencoderKL:
    return AutoencoderKL(**config,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * SAMPLE_SIZE,
    )


# --- pipelines ---------------------------------------------------------------------------------------------------
def make_tiny_sd_pipeline(path: str | Path | None = None, prediction_type: str = "epsilon", seed: int = 0):
    """SD1.x-like tiny pipeline (SD2-like when ``prediction_type="v_prediction"``: linear attention projections).
    Saved with ``save_pretrained`` when ``path`` is given."""
    torch.manual_seed(seed)
    sd2 = prediction_type == "v_prediction"
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
    )
    vae = _vae()
    tokenizer = make_tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu" if sd2 else "quick_gelu"))
    scheduler = DDIMScheduler(
        **SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def make_tiny_sdxl_pipeline(path: str | Path | None = None, seed: int = 0):
    """SDXL-like tiny pipeline: CLIPTextModel + CLIPTextModelWithProjection (pooled dim 32), UNet with
    ``addition_embed_type="text_time"`` and ``projection_class_embeddings_input_dim = 6·8 + 32``."""
    torch.manual_seed(seed)
    addition_time_embed_dim = 8
    projection_dim = 32
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' penultimate hidden states, concatenated
        norm_num_groups=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
        transformer_layers_per_block=(1, 2),
    )
    vae = _vae()
    tokenizer = make_tiny_tokenizer()
    tokenizer_2 = make_tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, hidden_act="gelu", projection_dim=projection_dim)
    )
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def make_tiny_sd3_pipeline(path: str | Path | None = None, seed: int = 0, shift: float = 3.0):
    """SD3-like tiny pipeline, as diffusers' own SD3 tests build it but without T5 (``text_encoder_3=None``, which
    the pipeline replaces by zeros): two CLIPTextModelWithProjection encoders (pooled 2·32), an SD3 transformer with
    2×2 patches on 8×8×4 latents, a VAE with SD3's shift and scale, FlowMatchEulerDiscreteScheduler(shift)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_HIDDEN, caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=SAMPLE_SIZE,
    )
    tokenizer, tokenizer_2 = make_tiny_tokenizer(), make_tiny_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_act="gelu", projection_dim=TEXT_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu", projection_dim=TEXT_HIDDEN))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5305), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def make_tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 (unigram) tokenizer whose pieces are :data:`WORDS` (built with ``tokenizers``: no sentencepiece model is
    needed, and nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()  # what T5Tokenizer itself uses, so a saved copy agrees
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           model_max_length=MAX_LENGTH)


def make_tiny_flux_pipeline(path: str | Path | None = None, seed: int = 0, guidance_embeds: bool = True):
    """FLUX.1-like tiny pipeline, as diffusers' own Flux tests build it: CLIPTextModel (pooled 32) and a tiny T5
    encoder, a FLUX transformer on 2×2-packed 8×8×4 latents (``in_channels`` 16), a VAE with FLUX's shift and
    scale. ``guidance_embeds=True`` is FLUX.1-dev (embedded guidance, dynamic shifting), False FLUX.1-schnell
    (shift 1)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=TEXT_HIDDEN, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    tokenizer = make_tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=make_tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


# --- original (LDM) single-file layout ----------------------------------------------------------------------------
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _rename(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> original SD key names (``model.diffusion_model.*``)."""
    L = unet.config.layers_per_block
    up_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        head = ".".join(parts[:-1])
        new = None
        if head in _UNET_TOP:
            new = f"{_UNET_TOP[head]}.{parts[-1]}"
        elif parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * (L + 1) + int(parts[3])}.0.{_rename(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * (L + 1) + int(parts[3])}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{1 + b * (L + 1) + L}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{_rename(rest, _UNET_RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{b * (L + 1) + int(parts[3])}.0.{_rename(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * (L + 1) + int(parts[3])}.1.{rest}"
            elif kind == "upsamplers":
                slot = 2 if b in up_attn else 1
                new = f"output_blocks.{b * (L + 1) + L}.{slot}.conv.{'.'.join(parts[5:])}"
        if new is None:
            raise KeyError(f"no original-layout name for UNet key {key!r}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> original key names (``first_stage_model.*``)."""
    n_up = len(vae.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        else:
            coder, sub = parts[0], parts[1]
            if sub in ("conv_in", "conv_out", "conv_norm_out"):
                new = f"{coder}.{_VAE_TOP.get(sub, sub)}.{parts[-1]}"
            elif sub == "down_blocks":
                i, kind = int(parts[2]), parts[3]
                if kind == "resnets":
                    rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                    new = f"{coder}.down.{i}.block.{parts[4]}.{rest}"
                else:
                    new = f"{coder}.down.{i}.downsample.conv.{parts[-1]}"
            elif sub == "up_blocks":
                i, kind = int(parts[2]), parts[3]
                j = n_up - 1 - i
                if kind == "resnets":
                    rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                    new = f"{coder}.up.{j}.block.{parts[4]}.{rest}"
                else:
                    new = f"{coder}.up.{j}.upsample.conv.{parts[-1]}"
            elif sub == "mid_block":
                kind, rest = parts[2], ".".join(parts[4:])
                if kind == "resnets":
                    new = f"{coder}.mid.block_{int(parts[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
                else:
                    new = f"{coder}.mid.attn_1.{_rename(rest, _VAE_ATTN)}"
                    if value.ndim == 2:  # linear -> 1×1 conv, as stored by the original code
                        value = value[:, :, None, None]
            else:
                raise KeyError(f"no original-layout name for VAE key {key!r}")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> ``cond_stage_model.transformer.text_model.*``."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out


def sd_pipeline_to_single_file(pipe: StableDiffusionPipeline, file: str | Path) -> Path:
    """Write an SD1-like pipeline's UNet, VAE and CLIP text encoder as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae), **clip_to_ldm(pipe.text_encoder)}
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(state, str(file))
    return Path(file)


def make_tiny_clip(folder: str | Path) -> Path:
    """A randomly initialised transformers ``CLIPModel`` (2 layers, width 32, 32 px images, projection 16) saved with
    its tokenizer files (a BPE vocabulary of single letters, plain and word-final, a few merges and the two special
    tokens) and an OpenAI-CLIP image preprocessor config, so that ``ClipScorer(folder)`` loads it offline."""
    import string

    from transformers import CLIPConfig, CLIPModel

    from stepdistill.eval.clip_score import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    folder = Path(folder)
    folder.mkdir(parents=True)
    letters = list(string.ascii_lowercase)
    vocab = {ch: i for i, ch in enumerate(letters + [ch + "</w>" for ch in letters])}
    merges = ["r e", "re d</w>", "c a", "ca t</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": 32}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }), encoding="utf-8")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(folder))
    return folder


# --- pipeline presets ---------------------------------------------------------------------------------------------
def make_tiny_teacher_spec(tmp_path: str | Path) -> Path:
    """A tiny SD teacher saved under ``tmp_path/teacher`` and the pipeline preset naming it (``tmp_path/pipe.yaml``)."""
    tmp_path = Path(tmp_path)
    make_tiny_sd_pipeline(tmp_path / "teacher")
    spec = tmp_path / "pipe.yaml"
    spec.write_text(f"teacher: {tmp_path / 'teacher'}\ndtype: float32\n")
    return spec
