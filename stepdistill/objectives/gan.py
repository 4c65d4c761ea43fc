"""DMD2's GAN branch: a classifier head on the fake-score UNet's bottleneck (Yin et al. 2024, §4.3; official code
tianweiy/DMD2 ``main/sd_guidance.py`` ``cls_pred_branch`` / ``compute_cls_logits`` and ``main/sd_unet_forward.py``).

On a flow-matching transformer (SD3, FLUX), which has no mid block, the "bottleneck" is the image-token output of the
middle double-stream block (``transformer_blocks[N // 2]``), its (B, L, D) tokens laid back on their (H/p)×(W/p)
grid as a (B, D, H/p, W/p) map (row-major, as the patch embedding and FLUX's packing order them), and the pass stops
there as well (:func:`feature_module`).

The fake-score UNet is run on (optionally slightly noised) latents up to its mid block; the mid-block output (the
bottleneck, 1280×8×8 for SD1.5 at 512 px) goes through strided 4×4 convolutions + GroupNorm + SiLU down to 1×1 and a
1×1 convolution to one realism logit. The official code stops the UNet after the mid block with a patched forward;
here a forward hook on ``unet.mid_block`` captures the output and aborts the rest of the pass (the up path is never
computed), so any diffusers ``UNet2DConditionModel`` works unmodified.

Losses (non-saturating, as the official code): discriminator ``softplus(D(fake)) + softplus(−D(real))``,
generator ``softplus(−D(fake))``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import nn

from stepdistill.models.conditioning import architecture, is_transformer, unet_forward


class _BottleneckReached(Exception):
    def __init__(self, features: torch.Tensor) -> None:
        super().__init__("bottleneck reached")
        self.features = features


def feature_module(net: nn.Module) -> nn.Module:
    """The block whose output the discriminators read: a UNet's ``mid_block``, or the middle double-stream block
    (``transformer_blocks[N // 2]``) of an SD3 / FLUX transformer."""
    model = architecture(net)
    if is_transformer(model):
        return model.transformer_blocks[len(model.transformer_blocks) // 2]
    if getattr(model, "mid_block", None) is None:
        raise ValueError(f"the fake-score network ({type(model).__name__}) has no mid_block; the GAN discriminators "
                         "read a UNet's mid-block output or an SD3 / FLUX transformer block")
    return model.mid_block


def _feature_map(net: nn.Module, output) -> torch.Tensor:
    """The feature map of :func:`feature_module`'s output: the UNet mid block's tensor, or a transformer block's
    image tokens (the second of its ``(encoder_hidden_states, hidden_states)``) as a square (B, D, h, w) grid."""
    if not is_transformer(net):
        return output[0] if isinstance(output, tuple) else output
    tokens = output[1]
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the GAN discriminators need a square token grid; got {n} image tokens (square images only)")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def bottleneck_features(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds) -> torch.Tensor:
    """The output of :func:`feature_module` (a UNet's ``mid_block``, a transformer's middle block as a map) for input
    ``x_t`` at model timesteps ``t`` (``schedule.model_timestep``) under the conditional embeddings (no guidance); the
    rest of the network is not evaluated. Autograd follows the caller's grad mode."""
    module = feature_module(unet)

    def hook(_module, _inputs, output):
        raise _BottleneckReached(_feature_map(unet, output))

    handle = module.register_forward_hook(hook)
    try:
        unet_forward(unet, x_t, t, embeds, guidance_scale=1.0)
    except _BottleneckReached as stop:
        return stop.features
    finally:
        handle.remove()
    raise RuntimeError("the UNet forward finished without running its mid_block")


@contextlib.contextmanager
def capture_bottleneck(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the context every forward of ``unet`` appends its :func:`feature_module` output (as a map) to the
    yielded list (the full forward still runs), so one pass gives both the network's prediction and its bottleneck —
    as SiDA's ``return_flag='encoder_decoder'`` does."""
    module = feature_module(unet)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_feature_map(unet, output))

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def bottleneck_shape(unet: nn.Module, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of the bottleneck for latents of shape ``latent_shape`` = (C, H, W): for a UNet the
    last ``block_out_channels`` and the latent size halved once per down block that has a downsampler; for a
    transformer its width (heads × head size) on the (H/p)×(W/p) token grid (p: SD3's patch size, 2 for FLUX)."""
    if is_transformer(unet):
        config = unet.config
        patch = int(config.patch_size) if isinstance(architecture(unet), SD3Transformer2DModel) else 2
        _, h, w = latent_shape
        return int(config.num_attention_heads * config.attention_head_dim), h // patch, w // patch
    model = architecture(unet)
    channels = int(model.config.block_out_channels[-1])
    n_down = sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))
    _, h, w = latent_shape
    for _ in range(n_down):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return channels, h, w


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class ClassifierHead(nn.Module):
    """Strided convs + GroupNorm + SiLU to one logit per sample.

    ``Conv4×4/2`` blocks halve the bottleneck until it is at most 4×4 (SD1.5: 8×8 → 4×4; SDXL: 32 → 16 → 8 → 4), then a
    convolution with kernel = stride = the remaining size brings it to 1×1 (the official ``4×4, stride 4``), then a
    1×1 convolution outputs the logit. Channels stay at the bottleneck width, as in the official branch."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        h, w = height, width
        while max(h, w) > 4 and min(h, w) >= 2:
            layers += [
                nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(_groups(channels), channels),
                nn.SiLU(),
            ]
            h, w = h // 2, w // 2
        layers += [
            nn.Conv2d(channels, channels, kernel_size=(h, w), stride=(h, w), padding=0),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, kernel_size=1),
        ]
        self.net = nn.Sequential(*layers)
        self.in_shape = (channels, height, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).squeeze(1)


def discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``mean softplus(D(fake)) + mean softplus(−D(real))`` (low when D says real on real and fake on fake)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``mean softplus(−D(fake))`` (low when D believes the generator's samples are real)."""
    return F.softplus(-logits_fake).mean()
