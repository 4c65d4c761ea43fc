"""Training of the toy teacher (VAE, then text encoder + UNet) and the toy evaluator, reproducible from a seed.

The teacher is trained like Stable Diffusion: an AutoencoderKL on images (reconstruction + a small KL term), then
the UNet on the VAE's scaled latents with the epsilon-prediction denoising loss, ‖ε_θ(x_t, t, c) − ε‖², the text
encoder trained jointly and the prompt dropped to "" 10% of the time so that classifier-free guidance works.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stepdistill.core.assets import toy_teacher_path, write_call_kwargs
from stepdistill.core.outputs import staged_folder
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.toy import models, world
from stepdistill.toy.evaluator import ToyEvaluator, evaluator_loss
from stepdistill.toy.tokenizer import build_tokenizer_files


def _drop_local_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` (the machine's local path a component was loaded from) from every component config
    of a pipeline folder about to be shipped."""
    for config_file in folder.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def train_vae(steps: int, batch_size: int, seed: int, lr: float = 1e-3, kl_weight: float = 1e-6):
    torch.manual_seed(seed)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="toy VAE")
    for step in bar:
        images, _ = world.sample(seed * 1_000_003 + step, batch_size)
        x = torch.from_numpy(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = F.mse_loss(recon, x)
        loss = rec_loss + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}")
    vae.eval()
    return vae, float(rec_loss)


@torch.no_grad()
def encode_dataset(vae, n: int, seed: int, batch_size: int = 500) -> tuple[torch.Tensor, list[str]]:
    """Unscaled posterior samples of N world images and their prompts."""
    latents, prompts = [], []
    gen = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, n, batch_size), desc="encode latents"):
        images, attrs = world.sample(seed + 7919 * start, min(batch_size, n - start))
        post = vae.encode(torch.from_numpy(images)).latent_dist
        latents.append(post.mean + post.std * torch.randn(post.mean.shape, generator=gen))
        prompts += attrs.prompts()
    return torch.cat(latents), prompts


def train_teacher(
    out_dir: str | Path,
    seed: int = 0,
    vae_steps: int = 1000,
    vae_batch_size: int = 64,
    unet_steps: int = 5000,
    batch_size: int = 96,
    lr: float = 6e-4,
    num_latents: int = 60_000,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    vae_cache: str | Path | None = None,
) -> dict:
    """Train the whole toy teacher and save it as a diffusers StableDiffusionPipeline folder at ``out_dir``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    t_start = time.time()
    from diffusers import AutoencoderKL

    if vae_cache is not None and (Path(vae_cache) / "config.json").is_file():  # resume after an interrupted run
        vae = AutoencoderKL.from_pretrained(vae_cache, local_files_only=True).eval()
        vae_from_cache = True
        vae_info = json.loads((Path(vae_cache) / "vae_info.json").read_text())
        vae_rec = vae_info["vae_reconstruction_mse"]
        t_start -= vae_info.get("vae_seconds", 0.0)  # count the cached VAE's own training time in the total
    else:
        vae_from_cache = False
        vae, vae_rec = train_vae(vae_steps, vae_batch_size, seed)
        if vae_cache is not None:
            vae.save_pretrained(vae_cache)
            (Path(vae_cache) / "vae_info.json").write_text(json.dumps(
                {"vae_reconstruction_mse": vae_rec, "vae_seconds": round(time.time() - t_start, 1),
                 "vae_steps": vae_steps, "vae_batch_size": vae_batch_size, "seed": seed}))
    t_vae = time.time() - t_start

    raw_latents, prompts = encode_dataset(vae, num_latents, seed + 1)
    scaling_factor = float(1.0 / raw_latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = raw_latents * scaling_factor

    with staged_folder(Path(out_dir), "the toy teacher") as tok_dir:
        tok_dir.mkdir(parents=True)
        build_tokenizer_files(tok_dir / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer", local_files_only=True)
        ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        prompt_ids, empty_ids = ids[:-1], ids[-1]

        text_encoder = models.make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                tokenizer.model_max_length)
        unet = models.make_unet()
        scheduler = models.make_scheduler()
        schedule = NoiseSchedule.from_scheduler(scheduler)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=unet_steps, pct_start=0.03)
        ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
        gen = torch.Generator().manual_seed(seed + 2)
        bar = tqdm(range(unet_steps), desc="toy teacher UNet")
        running = None
        for step in bar:
            idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
            x0 = latents[idx]
            batch_ids = prompt_ids[idx].clone()
            drop = torch.rand(batch_size, generator=gen) < cond_dropout
            batch_ids[drop] = empty_ids
            noise = torch.randn(x0.shape, generator=gen)
            t = schedule.sample_timesteps(batch_size, generator=gen)
            x_t = schedule.add_noise(x0, noise, t)
            cond = text_encoder(batch_ids).last_hidden_state
            pred = unet(x_t, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, schedule.target(x0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr_sched.step()
            decay = min(ema_decay, (1 + step) / (10 + step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_text, text_encoder, decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running:.4f}")

        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=ema_text.eval(), tokenizer=tokenizer, unet=ema_unet.eval(), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(tok_dir, safe_serialization=True)
        _drop_local_paths(tok_dir)  # a cached VAE would record its local cache path
        info = {
            "seed": seed, "vae_steps": vae_steps, "vae_batch_size": vae_batch_size, "vae_reconstruction_mse": vae_rec,
            "unet_steps": unet_steps, "batch_size": batch_size,
            "unet_block_out_channels": list(unet.config.block_out_channels),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "vae_from_cache": vae_from_cache, "lr": lr, "num_latents": num_latents,
            "ema_decay": ema_decay, "cond_dropout": cond_dropout, "final_loss_ema": running,
            "scaling_factor": scaling_factor, "vae_seconds": round(t_vae, 1),
            "total_seconds": round(time.time() - t_start, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
        }
        (tok_dir / "training_info.json").write_text(json.dumps(info, indent=2))
    return info


def random_blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.2, p: float = 0.5) -> torch.Tensor:
    """Gaussian blur with σ ~ U[0.3, max_sigma] px on a random fraction ``p`` of the images (separable 5-tap kernel).

    Generated images are softer than the procedural renders (the VAE blurs edges); the evaluator must read the
    attributes of a soft image as well as of a sharp one. Sharpness itself is FID's business, not the heads'."""
    n = images.shape[0]
    sigma = 0.3 + (max_sigma - 0.3) * torch.rand(n, generator=generator)
    apply = torch.rand(n, generator=generator) < p
    x = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # (N, 5)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    out = torch.empty_like(images)
    for i in range(n):
        if not apply[i]:
            out[i] = images[i]
            continue
        k = kernels[i]
        h = F.conv2d(padded[i:i + 1], k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        out[i:i + 1] = F.conv2d(h, k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
    return out


def train_evaluator(out_dir: str | Path, seed: int = 0, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                    eval_samples: int = 5000, blur_p: float = 0.5) -> dict:
    """Train the toy evaluator on fresh world samples (half of them blurred, see :func:`random_blur`); report
    held-out accuracy and continuous-attribute error on sharp and on blurred samples."""
    torch.manual_seed(seed)
    t_start = time.time()
    model = ToyEvaluator()
    aug_gen = torch.Generator().manual_seed(seed + 31)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="toy evaluator")
    for step in bar:
        images, attrs = world.sample(10_000_019 * (seed + 1) + step, batch_size)
        out = model(random_blur(torch.from_numpy(images), aug_gen, p=blur_p) if blur_p > 0 else torch.from_numpy(images))
        discrete = {k: torch.from_numpy(v) for k, v in attrs.discrete().items()}
        loss = evaluator_loss(out, discrete, torch.from_numpy(attrs.continuous()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    metrics = evaluate_evaluator(model, eval_samples, seed=987_654_321)
    blurred = evaluate_evaluator(model, eval_samples, seed=987_654_321, blur_sigma=1.0)
    info = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "blur_p": blur_p,
            "train_seconds": round(time.time() - t_start, 1), "held_out": metrics, "held_out_blurred_sigma_0.3_to_1": blurred}
    with staged_folder(Path(out_dir), "the toy evaluator") as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def evaluate_evaluator(model: ToyEvaluator, n: int, seed: int, blur_sigma: float = 0.0) -> dict:
    """Held-out accuracy per discrete attribute and mean absolute error per continuous one, on fresh samples
    (optionally all blurred with σ = ``blur_sigma`` px)."""
    images, attrs = world.sample(seed, n)
    if blur_sigma > 0:
        images = random_blur(torch.from_numpy(images), torch.Generator().manual_seed(0), max_sigma=blur_sigma,
                             p=1.0).numpy()
    correct = {k: 0 for k in world.DISCRETE_ATTRIBUTES}
    abs_err = np.zeros(len(world.CONTINUOUS_ATTRIBUTES))
    cont = attrs.continuous()
    for s in range(0, n, 500):
        out = model(torch.from_numpy(images[s:s + 500]))
        for k in correct:
            correct[k] += int((out[k].argmax(1).numpy() == attrs.discrete()[k][s:s + 500]).sum())
        abs_err += np.abs(out["continuous"].numpy() - cont[s:s + 500]).sum(0)
    return {
        "accuracy": {k: v / n for k, v in correct.items()},
        "mae": {k: float(e / n) for k, e in zip(world.CONTINUOUS_ATTRIBUTES, abs_err)},
        "num_samples": n,
    }


# --- the toy flow-matching teacher ------------------------------------------------------------------------------------
def build_flow_pipeline(transformer=None, teacher_dir: str | Path | None = None, **transformer_overrides):
    """A ``StableDiffusion3Pipeline`` for the toy world around ``transformer`` (default: a fresh
    :func:`models.make_flow_transformer` with ``transformer_overrides``): the shipped toy teacher's VAE (its weights
    and scaling factor, with ``shift_factor=0`` registered so that the SD3 pipeline's decode
    ``latents/scaling_factor + shift_factor`` works), its tokenizer twice and its CLIP text encoder twice as
    ``CLIPTextModelWithProjection`` (:func:`models.text_encoder_with_projection`), no T5 (``text_encoder_3=None``;
    the pipeline then pads with zeros, see :data:`models.FLOW_T5_TOKENS`) and the rectified-flow scheduler."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(teacher_dir) if teacher_dir is not None else toy_teacher_path()
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
    vae.register_to_config(shift_factor=0.0)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else models.make_flow_transformer(**transformer_overrides),
        scheduler=models.make_flow_scheduler(), vae=vae,
        text_encoder=models.text_encoder_with_projection(clip), tokenizer=tokenizer,
        text_encoder_2=models.text_encoder_with_projection(clip), tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_flow_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states, pooled_projections) of ``prompts`` exactly as the SD3 pipeline conditions the
    transformer when sampled with ``max_sequence_length=FLOW_T5_TOKENS`` (``StableDiffusion3Pipeline.encode_prompt``:
    both CLIP encoders' penultimate hidden states side by side, then the zero T5 tokens; the pooled projections
    concatenated). Differentiable in the text encoders' weights unless called under ``torch.no_grad()``."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"), num_images_per_prompt=1,
        do_classifier_free_guidance=False, max_sequence_length=models.FLOW_T5_TOKENS)
    return embeds, pooled


def flow_matching_loss(transformer, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The rectified-flow loss of SD3 training (Esser et al. 2024, eq. 6 with the logit-normal density placed in
    ``t``; diffusers ``examples/dreambooth/train_dreambooth_sd3.py`` with ``--weighting_scheme logit_normal`` and no
    output preconditioning): ``‖v_θ(x_σ, 1000σ, c) − (ε − x₀)‖²`` with ``x_σ = (1 − σ)x₀ + σε``, all through the
    schedule's own functions (``add_noise``, ``model_timestep``, ``target``)."""
    x_t = schedule.add_noise(x0, noise, t)
    pred = transformer(hidden_states=x_t, timestep=schedule.model_timestep(t), encoder_hidden_states=encoder_hidden_states,
                       pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(pred.float(), schedule.target(x0, noise, t).float())


def _store_half(folder: Path) -> None:
    """Rewrite every float32 tensor of ``folder/*.safetensors`` as float16 (the stored form; loading with
    ``dtype=torch.float32`` upcasts it)."""
    from safetensors.torch import load_file, save_file

    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}, file,
                  metadata={"format": "pt"})


def train_flow_teacher(
    out_dir: str | Path,
    seed: int = 2,
    steps: int = 6000,
    batch_size: int = 64,
    lr: float = 5e-4,
    num_latents: int = 60_000,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    train_text_encoders: bool = False,
    transformer_overrides: dict | None = None,
    half_precision_storage: bool = True,
    teacher_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    link_shared: bool = False,
) -> dict:
    """Train the toy flow-matching teacher and save it as a diffusers ``StableDiffusion3Pipeline`` folder.

    As diffusers' ``train_dreambooth_sd3.py`` trains SD3: latents of the toy world from the shipped VAE
    (:func:`encode_dataset`, scaled by its ``scaling_factor``), σ from the logit-normal density (mean 0, std 1) on the
    scheduler's table, ``x_σ = (1 − σ)x₀ + σε`` and the flow target ``ε − x₀`` (:func:`flow_matching_loss`), the
    prompt replaced by "" with probability ``cond_dropout`` (for classifier-free guidance), an EMA of the weights
    saved. The text encoders stay frozen unless ``train_text_encoders`` (then trained jointly, with their own EMA).
    The transformer is stored in float16 when ``half_precision_storage`` (to keep the repository small).
    ``init_from``: a folder this function wrote; its transformer (and, if it trained them, its text encoders) is the
    starting point instead of a fresh one, and its ``training_info.json`` is kept in the new one's ``init_from``
    (training continued with a fresh optimizer, learning-rate cycle and data draw: pass another ``seed``).
    ``link_shared``: store the files that are byte-identical copies (the VAE's weights, equal to the toy teacher's; the
    second text encoder, equal to the first while they are frozen) as relative symbolic links
    (:func:`link_identical_components`), for the folder shipped in the repository."""
    torch.manual_seed(seed)
    t_start = time.time()
    init_info = None
    if init_from is not None:
        from diffusers import SD3Transformer2DModel

        init_dir = Path(init_from)
        init_info = json.loads((init_dir / "training_info.json").read_text())
        start = SD3Transformer2DModel.from_pretrained(init_dir / "transformer", local_files_only=True,
                                                      torch_dtype=torch.float32)
        differing = {k: (start.config[k], v) for k, v in (transformer_overrides or {}).items() if start.config[k] != v}
        if differing:
            raise ValueError(f"--init-from {init_dir} holds another transformer size ({differing}: its value, "
                             "asked); drop the size options or give the size it was trained with")
        pipe = build_flow_pipeline(transformer=start, teacher_dir=teacher_dir)
        if init_info.get("train_text_encoders"):
            from transformers import CLIPTextModelWithProjection

            pipe.text_encoder, pipe.text_encoder_2 = (CLIPTextModelWithProjection.from_pretrained(
                init_dir / name, local_files_only=True, dtype=torch.float32) for name in ("text_encoder", "text_encoder_2"))
    else:
        pipe = build_flow_pipeline(teacher_dir=teacher_dir, **(transformer_overrides or {}))
    transformer, vae = pipe.transformer, pipe.vae
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    for encoder in encoders:
        encoder.requires_grad_(train_text_encoders).train(train_text_encoders)
    raw_latents, prompts = encode_dataset(vae, num_latents, seed + 1)
    latents = raw_latents * float(vae.config.scaling_factor)  # the shipped VAE's factor, shift 0

    table = sorted(set(prompts)) + [""]  # the prompts met in training; "" last (the dropped prompt)
    row = {p: i for i, p in enumerate(table)}
    prompt_rows = torch.tensor([row[p] for p in prompts])
    if not train_text_encoders:
        with torch.no_grad():
            table_embeds, table_pooled = encode_flow_prompts(pipe, table)

    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    params = list(transformer.parameters()) + ([p for e in encoders for p in e.parameters()] if train_text_encoders else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.03)
    trained = [transformer] + (encoders if train_text_encoders else [])
    emas = [copy.deepcopy(m).requires_grad_(False) for m in trained]
    transformer.train()
    gen = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(steps), desc="toy flow teacher")
    running = None
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        x0 = latents[idx]
        rows = prompt_rows[idx].clone()
        rows[torch.rand(batch_size, generator=gen) < cond_dropout] = len(table) - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = schedule.sample_timesteps_logit_normal(batch_size, mean=0.0, std=1.0, generator=gen)
        if train_text_encoders:
            cond, pooled = encode_flow_prompts(pipe, [table[int(r)] for r in rows])
        else:
            cond, pooled = table_embeds[rows], table_pooled[rows]
        loss = flow_matching_loss(transformer, schedule, x0, noise, t, cond, pooled)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        for ema, model in zip(emas, trained):
            _ema_update(ema, model, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")

    pipe.transformer = emas[0].eval()
    if train_text_encoders:
        pipe.text_encoder, pipe.text_encoder_2 = emas[1].eval(), emas[2].eval()
    info = {
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "num_latents": num_latents,
        "ema_decay": ema_decay, "cond_dropout": cond_dropout, "train_text_encoders": train_text_encoders,
        "timestep_density": "logit-normal (mean 0, std 1) on the scheduler's sigma table",
        "loss": "MSE of the flow prediction to eps - x0 (no weighting, no output preconditioning)",
        "transformer_config": {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "scheduler_shift": float(pipe.scheduler.config.shift), "max_sequence_length": models.FLOW_T5_TOKENS,
        "scaling_factor": float(vae.config.scaling_factor), "shift_factor": 0.0,
        "transformer_storage_dtype": "float16" if half_precision_storage else "float32",
        "final_loss_ema": running, "total_seconds": round(time.time() - t_start, 1),
        "init_from": None if init_info is None else {"folder": Path(init_from).name, "training_info": init_info},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    with staged_folder(Path(out_dir), "the toy flow teacher") as tmp:
        tmp.mkdir(parents=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if half_precision_storage:
            _store_half(tmp / "transformer")
        _drop_local_paths(tmp)
        write_call_kwargs(tmp, {"max_sequence_length": models.FLOW_T5_TOKENS})
        if link_shared:
            info["linked_components"] = link_identical_components(
                tmp, {"vae": Path(teacher_dir) / "vae" if teacher_dir is not None else toy_teacher_path() / "vae",
                      "text_encoder_2": tmp / "text_encoder"})
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def link_identical_components(folder: Path, sources: dict[str, Path]) -> dict[str, list[str]]:
    """Replace each file of the component folder ``folder/name`` that is byte-identical to the file of the same name
    in ``sources[name]`` by a relative symbolic link to it (diffusers and transformers load through links as through
    copies). Files that differ (e.g. the VAE's config, which records ``shift_factor``) stay. Returns
    {component: [linked file names]} for the components with at least one link."""
    import filecmp
    import os

    linked: dict[str, list[str]] = {}
    for name, source in sources.items():
        for own in sorted((folder / name).iterdir()):
            theirs = Path(source) / own.name
            if own.is_symlink() or not theirs.is_file() or not filecmp.cmp(own, theirs, shallow=False):
                continue
            # relative to the component folder, which keeps its depth when the staged folder is renamed into place
            target = os.path.relpath(os.path.abspath(theirs), os.path.abspath(own.parent))
            own.unlink()
            own.symlink_to(target)
            linked.setdefault(name, []).append(own.name)
    return linked
