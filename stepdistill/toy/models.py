"""Configurations of the toy teacher's components: a Stable Diffusion pipeline scaled down to 32 px images and
8x8x4 latents. These are ordinary diffusers / transformers classes; only the sizes differ from SD1.5."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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
