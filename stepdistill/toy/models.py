"""Configurations of the toy teacher's components: a Stable Diffusion pipeline scaled down to 32 px images and
8x8x4 latents. These are ordinary diffusers / transformers classes; only the sizes differ from SD1.5."""

from __future__ import annotations

import copy

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

RESOLUTION = 32
LATENT_CHANNELS = 4
LATENT_SIZE = 8
TEXT_DIM = 128

# The SD1.x noise schedule (scaled_linear betas 0.00085-0.012, 1000 steps, epsilon prediction). "trailing" spacing
# makes a 1-step call start at t=999 (pure noise), so few-step teacher baselines are honest.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,  # unused by "trailing" spacing; 1 keeps diffusers from warning
    timestep_spacing="trailing",
)


def make_vae() -> AutoencoderKL:
    """32x32x3 <-> 8x8x4 (two downsamplings)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    """An SD-style UNet for 8x8x4 latents with cross-attention to the text encoder (8.72M parameters).

    Widths (96, 96, 192): most of the capacity at the 8x8 and 4x4 levels, where the shapes' corners and edges live.
    Measured with CFG 3 at 50 steps (shape adherence by the toy evaluator): (32, 64, 128), 5,000 steps -> 0.72;
    (48, 96, 192), 7,000 steps -> 0.80 (its squares came out as lumpy blobs read as circles, and 600 more steps did
    not move it); (96, 96, 192), 5,000 steps -> 0.925, in about the same hour (1.4x the cost per step)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(96, 96, 192),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


# --- the toy flow-matching teacher: a StableDiffusion3Pipeline scaled down to the toy world ---------------------------
#: Shift of the flow teacher's FlowMatchEulerDiscreteScheduler (see :func:`make_flow_scheduler`).
FLOW_SHIFT = 1.0
#: Zero "T5" tokens the toy flow teacher is trained and sampled with. It has no T5 encoder (``text_encoder_3=None``),
#: so ``StableDiffusion3Pipeline.encode_prompt`` appends ``max_sequence_length`` all-zero tokens to the CLIP tokens;
#: the pipeline's default of 256 would make the 64-token image stream attend over 272 text tokens and cost 6x more per
#: call (measured: 1.78 s against 0.29 s per 144 latents). SD3 itself was trained with 77 CLIP + 77 T5 positions
#: (Esser et al. 2024, sec. 5.1); the toy keeps that layout at its own length, 16 + 16. Callers pass
#: ``max_sequence_length=FLOW_T5_TOKENS``; the asset records it in ``stepdistill_pipeline.json``.
FLOW_T5_TOKENS = 16
#: The flow teacher's transformer (4.53M parameters): patch 1 on 8x8 latents (64 image tokens; a 2x2 patch would leave
#: a 4x4 grid, coarser than the shapes' corners), width 160 = 5 heads x 32, 5 joint blocks. Sized by the repository
#: budget (stored in float16: 9.05 MB) and by cost on 2 CPU cores (width 128 x 4 blocks, 2.33M parameters, measured at
#: batch 128: 0.61 s per training step and 0.25 s per call on 144 latents, against 0.50 s for the toy SD teacher's
#: UNet; the SD3-like width 192 x 8 blocks 2.35 s / 1.11 s). At equal data 160 x 5 reached a lower loss and better
#: shapes than 128 x 4 (eval/results/toy-flow-teacher/).
FLOW_TRANSFORMER_CONFIG = dict(
    sample_size=LATENT_SIZE,
    patch_size=1,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=5,
    attention_head_dim=32,
    num_attention_heads=5,
    joint_attention_dim=2 * TEXT_DIM,  # the two CLIP encoders' hidden states side by side, as SD3 concatenates them
    caption_projection_dim=160,
    pooled_projection_dim=2 * TEXT_DIM,  # both encoders' pooled projections, concatenated
    pos_embed_max_size=LATENT_SIZE,
)


def flow_transformer_size(width: int, num_layers: int) -> dict:
    """The :data:`FLOW_TRANSFORMER_CONFIG` entries of a transformer ``width`` channels wide (attention heads of 32
    channels) with ``num_layers`` joint blocks."""
    head_dim = FLOW_TRANSFORMER_CONFIG["attention_head_dim"]
    if width <= 0 or width % head_dim or num_layers <= 0:
        raise ValueError(f"the flow transformer's width must be a positive multiple of {head_dim} and its layers "
                         f"positive; got width {width}, {num_layers} layers")
    return {"num_layers": num_layers, "num_attention_heads": width // head_dim, "caption_projection_dim": width}


def make_flow_transformer(**overrides) -> SD3Transformer2DModel:
    """An SD3 MMDiT (Esser et al. 2024) for 8x8x4 latents: joint attention between the image tokens and the text
    tokens (the CLIP hidden states projected by ``context_embedder``), timestep and pooled-text embedding through
    adaptive layer norm. ``overrides`` replace entries of :data:`FLOW_TRANSFORMER_CONFIG` (tests build tiny ones)."""
    return SD3Transformer2DModel(**{**FLOW_TRANSFORMER_CONFIG, **overrides})


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The rectified-flow scheduler, shift :data:`FLOW_SHIFT` = 1 (no shift; not compared with other values).

    SD3 shifts its σ grid by 3.0 at 1024 px because, at a fixed σ, a large image keeps more of its signal than a small
    one (more pixels average out the same noise), so the timesteps must move towards the noisy end to spend the same
    effort on global structure (Esser et al. 2024, sec. 5.3.2, "resolution-dependent shifting": σ shifted by
    sqrt(m/n) from n to m pixels, from the 256 px they first trained at). The toy's 32 px images are far below any
    resolution that needs a shift towards noise (the rule would give sqrt(32²/256²) = 1/8, a shift towards clean
    σ that flat shapes on plain backgrounds have no use for), so the toy keeps the neutral 1; the logit-normal
    density already concentrates training on the middle σ."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def text_encoder_with_projection(text_encoder: CLIPTextModel) -> CLIPTextModelWithProjection:
    """The SD3 pipeline's CLIP encoder type built from a ``CLIPTextModel``: the same encoder weights and a new
    ``text_projection`` (hidden -> projection_dim, no bias) initialised to the identity, so the pooled projection
    starts as the encoder's own pooled (end-of-text) state."""
    config = copy.deepcopy(text_encoder.config)
    config.architectures = ["CLIPTextModelWithProjection"]
    config.projection_dim = config.hidden_size
    out = CLIPTextModelWithProjection(config)
    source = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 keeps the encoder at the top level
    out.text_model.load_state_dict(source.state_dict(), strict=True)
    with torch.no_grad():
        out.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return out.eval()
