"""How far SiD's generator gradient moves when the frozen teacher UNet runs in bfloat16 instead of float32.

SiD's generator loss differentiates the teacher's x̂₀ through its input x_t, so the teacher's precision enters the
gradient the generator learns from (DMD-style objectives only read the teacher's output). On the embedded toy teacher
with the toy SiD recipe's settings (κ = 1.5, one step at t_init 625), for ``--batches`` batches of ``--batch-size``
toy prompts (fixed seeds, t ~ U{20 … 979} as the recipe draws it): the gradient of the generator's parameters with the
teacher in float32 (the reference) and in bfloat16 (the fake score stays float32, as stepdistill builds it), compared
by relative error ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ and cosine, at the start of distillation (generator and fake score
equal to the teacher) and, with ``--run``, at the latest checkpoint of a toy SiD run. Writes one JSON.

    stepdistill distill --pipeline pipelines/toy.yaml --recipe training/toy-sid.yaml --out runs/toy-sid
    python experiments/sid-teacher-precision/measure.py --run runs/toy-sid \\
        --out eval/results/sid-teacher-precision/result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepdistill.models import Generator, Teacher
from stepdistill.objectives import Batch, build_objective
from stepdistill.toy import world
from stepdistill.training import Trainer, load_recipe

REPO = Path(__file__).resolve().parents[2]


def generator_gradient(objective, batch: Batch, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    objective.generator.zero_grad(set_to_none=True)
    loss, _ = objective.generator_loss(batch, timesteps=timesteps, noise=noise)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in objective.generator.trainable_parameters()]).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "training" / "toy-sid.yaml"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--run", default=None, help="a toy SiD run folder: also measure at its latest checkpoint")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"recipe": str(Path(args.recipe).resolve().relative_to(REPO)), "teacher": "toy",
              "batches": args.batches, "batch_size": args.batch_size}
    result["at_start"] = measure(args, checkpoint_run=None)
    if args.run:
        result["at_checkpoint"] = measure(args, checkpoint_run=Path(args.run))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v)
                      for k, v in result.items()}, indent=2))


def measure(args, checkpoint_run: Path | None) -> dict:
    torch.manual_seed(0)
    config = load_recipe(args.recipe if checkpoint_run is None else checkpoint_run / "run_config.yaml")
    teacher = Teacher.load("toy")
    generator = Generator.from_teacher(teacher, timesteps=config.generator.timesteps,
                                       scaled_input_noise=config.generator.scaled_input_noise)
    objective = build_objective("sid", teacher, generator, config.objective_config)
    where = "the teacher's weights (update 0)"
    if checkpoint_run is not None:
        trainer = Trainer(config, teacher, generator, objective, ["unused"], checkpoint_run)
        loaded = trainer.load_checkpoint("latest")
        where = f"{checkpoint_run.name}/{loaded.name}"
    prompts = world.all_prompts()
    rows = []
    t0 = time.time()
    for b in range(args.batches):
        g = torch.Generator().manual_seed(1000 + b)
        chosen = [prompts[i] for i in torch.randint(len(prompts), (args.batch_size,), generator=g).tolist()]
        batch = Batch(embeds=teacher.encode_prompt(chosen, with_uncond=True),
                      noise=torch.randn((args.batch_size, *teacher.latent_shape), generator=g))
        t = torch.randint(config.objective_config.get("min_t", 20), config.objective_config.get("max_t", 980),
                          (args.batch_size,), generator=g)
        eps = torch.randn((args.batch_size, *teacher.latent_shape), generator=g)
        teacher.unet.to(torch.float32)
        reference = generator_gradient(objective, batch, t, eps)
        again = generator_gradient(objective, batch, t, eps)
        teacher.unet.to(torch.bfloat16)
        low = generator_gradient(objective, batch, t, eps)
        teacher.unet.to(torch.float32)
        rows.append({"batch": b, "relative_error_bf16": float((low - reference).norm() / reference.norm()),
                     "cosine_bf16": float(torch.nn.functional.cosine_similarity(low, reference, dim=0)),
                     "relative_error_fp32_repeat": float((again - reference).norm() / reference.norm())})
        print(rows[-1], flush=True)
    errors = torch.tensor([r["relative_error_bf16"] for r in rows])
    cosines = torch.tensor([r["cosine_bf16"] for r in rows])
    return {"weights": where, "generator_parameters": int(sum(p.numel() for p in generator.trainable_parameters())),
            "relative_error_bf16": {"median": float(errors.median()), "min": float(errors.min()),
                                    "max": float(errors.max())},
            "cosine_bf16": {"median": float(cosines.median()), "min": float(cosines.min()),
                            "max": float(cosines.max())},
            "relative_error_fp32_repeat_max": max(r["relative_error_fp32_repeat"] for r in rows),
            "seconds": round(time.time() - t0, 1), "rows": rows}


if __name__ == "__main__":
    main()
