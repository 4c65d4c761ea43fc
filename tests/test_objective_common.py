"""What the objectives share (stepdistill/objectives/base.py, common.py, regression.py, gan.py): the registry and
config validation, the official update schedule (generator first, its sample reused by the first fake-score update),
the teacher's guidance rule, the ODE-pair warm-up and the teacher DDIM pairs, the GAN classifier head.

Every expected gradient / loss is recomputed here INDEPENDENTLY of stepdistill.core.schedule, with the reference
maths of tests/reference_maths.py: ᾱ_t from the diffusers scheduler, CFG from separate uncond/cond UNet calls,
normalisers and weights written out by hand; timesteps and noise are fixed through the objective's keyword overrides
and the generator's x₀ is a leaf tensor, so that ``x0.grad · numel`` is exactly the gradient the surrogate loss puts
on x₀.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_maths import B, T_FIXED, ac, eps_by_hand, fixed_eps, leaf_x0, noised, x0_by_hand

from stepdistill.objectives import (
    OBJECTIVES,
    Batch,
    ObjectiveConfigError,
    RegressionPairs,
    build_objective,
    make_regression_pairs,
)
from stepdistill.objectives.gan import ClassifierHead, bottleneck_features, bottleneck_shape
from stepdistill.models.generators import Generator
from stepdistill.models.conditioning import PromptEmbeds


# --- registry and config validation -----------------------------------------------------------------------------------
def test_registry_and_config_validation(teacher, generator):
    assert set(OBJECTIVES) >= {"dmd", "dmd2", "vsd"}
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        build_objective("nope", teacher, generator, {})
    with pytest.raises(ValueError) as err:
        build_objective("dmd2", teacher, generator, {"real_guidance": 2.0})
    assert "'real_guidance'" in str(err.value) and "real_guidance_scale" in str(err.value)
    with pytest.raises(ValueError, match="min_t_ratio"):
        build_objective("vsd", teacher, generator, {"min_t_ratio": 0.9, "max_t_ratio": 0.1})
    with pytest.raises(ValueError, match="aux_updates_per_generator_update"):
        build_objective("dmd", teacher, generator, {"aux_updates_per_generator_update": 0})
    with pytest.raises(ValueError, match="guidance_scale_range"):
        build_objective("vsd", teacher, generator, {"guidance_scale_range": [8.0, 2.0]})
    with pytest.raises(ValueError, match="diffusion_gan_max_t"):
        build_objective("dmd2", teacher, generator, {"diffusion_gan_max_t": 5000})


def test_cfg_without_uncond_is_a_clear_error(teacher, generator):
    obj = build_objective("dmd2", teacher, generator, {})
    leaf_x0(obj)
    batch = Batch(embeds=PromptEmbeds(cond=torch.randn(B, 6, 32)), noise=torch.randn(B, 4, 8, 8))
    with pytest.raises(ValueError, match="with_uncond"):
        obj.generator_loss(batch)


# --- the official update schedule (common.GeneratorFirstSchedule) -----------------------------------------------------
@pytest.mark.parametrize("name", ["dmd2", "dmd", "vsd"])
def test_official_schedule_generator_first_and_its_sample_trains_the_next_fake_score_update(teacher, tmp_path, name,
                                                                                              fresh_accelerate_state):
    """DMD2 (``train_sd.py``: generator turn, then the guidance turn on ``guidance_data_dict``), SwiftBrush and DMD's
    Algorithm 1: per step the generator update comes first and the first fake-score update trains on sg(x₀) of that
    update — the generator *before* its optimizer step — with the same prompts; later ones on fresh samples.
    ``aux_sample: fresh`` puts the fake-score updates first, each on a fresh sample."""
    from stepdistill.training import Trainer

    config = {"aux_updates_per_generator_update": 2}
    if name == "dmd":
        config["regression_weight"] = 0.0
    for aux_sample in ("reuse", "fresh"):
        gen = Generator.from_teacher(teacher)
        obj = build_objective(name, teacher, gen, {**config, "aux_sample": aux_sample})
        events = []
        generator_loss, auxiliary_loss, generate = obj.generator_loss, obj.auxiliary_loss, obj.generate

        def on_generate(batch, grad=True):
            x0 = generate(batch, grad=grad)
            events.append(("generate", x0.detach().clone(), batch.embeds.cond.clone()))
            return x0

        def on_generator(batch, **kw):
            events.append(("generator", None, None))
            return generator_loss(batch, **kw)

        def on_auxiliary(batch, **kw):
            seen = len(events)
            x0_used = {}
            original = obj.denoising_loss

            def spy(unet, x0, embeds, *args, **kwargs):
                x0_used["x0"], x0_used["cond"] = x0.detach().clone(), embeds.cond.clone()
                return original(unet, x0, embeds, *args, **kwargs)

            obj.denoising_loss = spy
            try:
                out = auxiliary_loss(batch, **kw)
            finally:
                obj.denoising_loss = original
            events.append(("auxiliary", x0_used["x0"], x0_used["cond"], len(events) > seen))
            return out

        obj.generate, obj.generator_loss, obj.auxiliary_loss = on_generate, on_generator, on_auxiliary
        cfg = {"objective": name, "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 0, "log_every": 1,
                                            "grad_clip": None}}
        Trainer(cfg, teacher, gen, obj, ["a red circle", "a blue square"], tmp_path / f"{name}-{aux_sample}").train()
        kinds = [e[0] for e in events if e[0] != "generate"]
        if aux_sample == "fresh":
            assert kinds == ["auxiliary", "auxiliary", "generator"] * 2
            assert all(e[3] for e in events if e[0] == "auxiliary")  # each drew its own sample
            continue
        assert kinds == ["generator", "auxiliary", "auxiliary"] * 2
        for step in range(2):
            gen_sample = [e for e in events if e[0] == "generate"][step * 2]  # the generator update's own
            first, second = [e for e in events if e[0] == "auxiliary"][2 * step: 2 * step + 2]
            assert not first[3] and second[3]  # the first drew no sample, the second a fresh one
            assert torch.equal(first[1], gen_sample[1].float()) and torch.equal(first[2], gen_sample[2])


def test_the_official_schedule_saves_one_generator_forward_per_update_and_the_trainer_counts_it(
        teacher, tmp_path, fresh_accelerate_state):
    """One-step DMD2 with 3 fake-score updates per generator update: the generator's own forward plus one per fake
    update that draws a fresh sample — 1 + 2 with ``reuse``, 1 + 3 with ``fresh`` (what distill-cost reports)."""
    from stepdistill.training import Trainer

    counts = {}
    for aux_sample in ("reuse", "fresh"):
        gen = Generator.from_teacher(teacher)
        obj = build_objective("dmd2", teacher, gen, {"aux_updates_per_generator_update": 3, "aux_sample": aux_sample})
        cfg = {"objective": "dmd2", "train": {"batch_size": 2, "max_steps": 2, "checkpoint_every": 0}}
        summary = Trainer(cfg, teacher, gen, obj, ["a red circle"], tmp_path / aux_sample).train()
        counts[aux_sample] = summary["generator_forwards_per_update"]
    assert counts == {"reuse": 3, "fresh": 4}


# --- the teacher's guidance (common.real_guidance) --------------------------------------------------------------------
def test_teacher_guidance_applies_only_above_one_as_the_official_dmd2(teacher, batch):
    """tianweiy/DMD2 ``predict_noise``: ``CFG_GUIDANCE = guidance_scale > 1``; a scale ≤ 1 is one conditional pass
    (the formula out(∅) + w·(out(c) − out(∅)) would extrapolate away from the prompt for w < 1)."""
    from stepdistill.objectives.common import real_guidance

    assert real_guidance(0.5) == 1.0 and real_guidance(1.0) == 1.0 and real_guidance(1.75) == 1.75
    obj = build_objective("dmd2", teacher, Generator.from_teacher(teacher), {})
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_t = noised(teacher, x0, fixed_eps(), T_FIXED)
    grads = {w: obj.matching_gradient(x0, x_t, T_FIXED, batch.embeds, obj.fake_unet, w)[0] for w in (0.5, 1.0, 2.0)}
    assert torch.equal(grads[0.5], grads[1.0]) and not torch.allclose(grads[2.0], grads[1.0])


# --- ODE pairs and the regression warm-up (regression.py) -------------------------------------------------------------
@pytest.mark.parametrize("method", ["dmd", "dmd2"])
def test_ode_warmup_is_regression_alone_then_distribution_matching(teacher, embeds, method):
    gen = Generator.from_teacher(teacher)
    obj = build_objective(method, teacher, gen, {"ode_warmup_steps": 2})
    assert obj.requirements(obj.config).regression_pairs_needed()
    g = torch.Generator().manual_seed(9)
    z_ref, y_ref = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    batch = Batch(embeds=embeds, noise=torch.randn(B, 4, 8, 8, generator=g), pairs=RegressionPairs(z_ref, embeds, y_ref))
    for step in (0, 1):  # warm-up: loss = MSE(G(z_ref), y_ref) alone, no auxiliary updates
        obj.set_train_step(step)
        assert obj.in_ode_warmup() and not obj.auxiliary_active()
        loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=fixed_eps())
        with torch.no_grad():
            expected = ((gen(z_ref, embeds) - y_ref) ** 2).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert logs["ode_warmup"] == 1.0 and "loss_dm" not in logs
    obj.set_train_step(2)  # then the objective's own loss (DMD: loss_DM + 0.25·loss_reg; DMD2: loss_DM)
    assert not obj.in_ode_warmup() and obj.auxiliary_active()
    loss, logs = obj.generator_loss(batch, timesteps=T_FIXED, noise=fixed_eps())
    assert "loss_dm" in logs and "ode_warmup" not in logs
    reg = 0.25 * logs["loss_reg"] if method == "dmd" else 0.0
    assert loss.item() == pytest.approx(logs["loss_dm"] + reg, rel=1e-5)
    # warm-up without pairs is a clear error
    obj.set_train_step(0)
    with pytest.raises(ValueError, match="ODE pairs"):
        obj.generator_loss(Batch(embeds=embeds, noise=torch.zeros(B, 4, 8, 8)))
    no_pairs = build_objective(method, teacher, gen, {"ode_warmup_steps": 0,
                                                      **({"regression_weight": 0.0} if method == "dmd" else {})})
    assert not no_pairs.requirements(no_pairs.config).regression_pairs_needed()
    with pytest.raises(ValueError, match="ode_warmup_steps"):
        build_objective(method, teacher, gen, {"ode_warmup_steps": -1})


def test_make_regression_pairs_is_the_teacher_ddim_ode(teacher):
    prompts = ["a red circle", "a blue square"]
    pairs = make_regression_pairs(teacher, prompts, num_steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert len(pairs) == 2 and pairs.latents.shape == (2, 4, 8, 8)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pairs.noise, z)
    emb = teacher.encode_prompt(prompts, with_uncond=True)
    # trailing DDIM, 2 steps: t = 999 then 499; x_499 = √ᾱ·x̂₀ + √(1−ᾱ)·ε̂; output = x̂₀ at t = 499
    t1, t2 = torch.tensor([999, 999]), torch.tensor([499, 499])
    e1 = eps_by_hand(teacher.unet, z, t1, emb, 3.0)
    x0_1 = x0_by_hand(teacher, e1, z, t1)
    a2 = ac(teacher, t2)
    x_499 = (a2.sqrt() * x0_1 + (1 - a2).sqrt() * e1).float()
    y = x0_by_hand(teacher, eps_by_hand(teacher.unet, x_499, t2, emb, 3.0), x_499, t2).float()
    torch.testing.assert_close(pairs.latents, y, rtol=1e-3, atol=1e-3 * float(y.abs().max()))


# --- the GAN classifier head (gan.py) ---------------------------------------------------------------------------------
def test_gan_head_reads_the_mid_block_and_skips_the_decoder(teacher, embeds):
    unet = teacher.unet
    assert bottleneck_shape(unet, teacher.latent_shape) == (64, 4, 4)
    captured, up_calls = [], []
    h1 = unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    h2 = unet.up_blocks[0].register_forward_hook(lambda m, i, o: up_calls.append(1))
    x = torch.randn(B, 4, 8, 8)
    t = torch.tensor([0, 5, 9])
    with torch.no_grad():
        feats = bottleneck_features(unet, x, t, embeds)
    assert up_calls == [] and feats.shape == (B, 64, 4, 4)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=embeds.cond)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(feats, captured[-1])
    head = ClassifierHead(64, 4, 4)
    assert head(feats).shape == (B,)
    # SD1.5-sized bottleneck (1280×8×8): one stride-2 4×4 conv, one 4×4 stride-4 conv, then the 1×1 logit conv
    sd15 = ClassifierHead(1280, 8, 8)
    convs = [m for m in sd15.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2)), ((4, 4), (4, 4)), ((1, 1), (1, 1))]
    assert sd15(torch.randn(2, 1280, 8, 8)).shape == (2,)


# --- every objective's numeric keys refuse NaN and infinity -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_numeric_objective_key_refuses_nan_and_inf(name):
    cls = OBJECTIVES[name]
    numeric = [k for k, v in cls.DEFAULTS.items() if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool))]
    optional = [k for k, v in cls.DEFAULTS.items() if v is None]
    assert numeric, f"{name} has no numeric key: the test would check nothing"
    for key in numeric + optional:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ObjectiveConfigError) as err:
                cls.check_config({key: bad})
            assert err.value.key == key
