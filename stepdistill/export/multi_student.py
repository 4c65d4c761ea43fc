"""Export of a multi-student (MSD) run as one diffusers folder.

The folder holds the shared VAE, text encoder, tokenizer and scheduler, one UNet per student (``unet`` for student 0,
``unet_1`` … after), the router in ``model_index.json`` and ``pipeline_multi_student.py``
(:mod:`stepdistill.export.shipped.pipeline_multi_student`, which imports only diffusers and torch), named in ``_class_name``
so that diffusers' own custom-pipeline mechanism loads it::

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

Built from the students' own exported folders (``<run>/student_<k>/student``), which must be one-step students at the
same timestep, from pure noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from stepdistill.core.outputs import check_output_folder, staged_folder
from stepdistill.export.common import (
    EXPORT_INFO_FILE,
    ExportError,
    remote_code_loading_call,
)
from stepdistill.export.loading import export_info, load_pipeline
from stepdistill.export.shipped import shipped_file
from stepdistill.export.shipped.pipeline_multi_student import (
    MAX_STUDENTS,
    MultiStudentPipeline,
)

PIPELINE_MODULE = "pipeline_multi_student"
PIPELINE_CLASS = "MultiStudentPipeline"


def export_multi_student(run_dir: Path, router, student_folders: Sequence[Path], students: Sequence[dict[str, Any]],
                         out_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Write ``<run_dir>/student`` (atomically) from the exported student folders; returns its path. An ``out_dir``
    that is not absent, empty or an earlier student folder is refused unless ``overwrite``."""
    from diffusers import UNet2DConditionModel

    out_dir = check_output_folder(out_dir or Path(run_dir) / "student", overwrite=overwrite,
                                  protect=[run_dir] if out_dir is not None else [])
    if len(student_folders) > MAX_STUDENTS:
        raise ExportError(f"the exported pipeline holds at most {MAX_STUDENTS} students, got {len(student_folders)}")
    infos = [export_info(f) for f in student_folders]
    for f, info in zip(student_folders, infos):
        if not info:
            raise ExportError(f"{f} is not an exported stepdistill student (no {EXPORT_INFO_FILE}); rerun the "
                              "student's distill with export")
        if len(info["timesteps"]) != 1 or info.get("scaled_input_noise"):
            raise ExportError(f"{f}: MSD students must be one-step students from pure noise, got timesteps "
                              f"{info['timesteps']} (scaled_input_noise {info.get('scaled_input_noise')})")
    t = {int(i["timesteps"][0]) for i in infos}
    if len(t) != 1:
        raise ExportError(f"the students are conditioned at different timesteps {sorted(t)}")
    (timestep,) = t
    shared = load_pipeline(student_folders[0])
    unets = [shared.unet] + [UNet2DConditionModel.from_pretrained(str(f / "unet"), local_files_only=True)
                             for f in student_folders[1:]]
    with staged_folder(out_dir, "the student") as tmp:
        pipe = MultiStudentPipeline(vae=shared.vae, text_encoder=shared.text_encoder, tokenizer=shared.tokenizer,
                                    unet=unets[0], scheduler=shared.scheduler, router=router.to_dict(),
                                    student_timestep=timestep, **{f"unet_{k}": u for k, u in enumerate(unets) if k})
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        shutil.copyfile(shipped_file(PIPELINE_MODULE), tmp / f"{PIPELINE_MODULE}.py")
        if (student_folders[0] / "scheduler").is_dir():  # a custom scheduler file shipped by the student export
            for py in (student_folders[0] / "scheduler").glob("*.py"):
                shutil.copyfile(py, tmp / "scheduler" / py.name)
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        info = {**{k: infos[0][k] for k in ("method", "base_model", "family", "prediction_type", "dtype")
                   if k in infos[0]},
                "method": f"msd+{infos[0].get('method')}", "timesteps": [timestep], "steps": 1,
                "students": len(unets), "router": router.to_dict() if router.kind == "keyword" else
                {"kind": "kmeans", "num_students": router.num_students},
                "guidance_scale": 1.0, "num_inference_steps_reproduces_timesteps": True, "trust_remote_code": True,
                "pipeline_class": f"{PIPELINE_MODULE}.{PIPELINE_CLASS}",
                "loading_call": remote_code_loading_call(str(out_dir)),
                "steps_info": {"students": list(students)}}
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(_card(str(out_dir), info, students), encoding="utf-8")
    return out_dir


def _card(folder: str, info: dict[str, Any], students: Sequence[dict[str, Any]]) -> str:
    example = students[0].get("example_prompt", "a prompt") if students else "a prompt"
    rows = "\n".join(f"| {s['student']} | `{'unet' if s['student'] == 0 else 'unet_' + str(s['student'])}` | "
                     f"{s['prompts']} | {s.get('steps')} |" for s in students)
    return (
        f"---\nlibrary_name: diffusers\nbase_model: {info.get('base_model')}\ntags: [stepdistill, msd, one-step]\n"
        f"inference: false\n---\n\n"
        f"# {len(students)} one-step students with a prompt router (MSD, stepdistill)\n\n"
        f"Each prompt goes to its own student ({info['router']['kind']} router, stored in `model_index.json`): one "
        f"UNet evaluation per image at t = {info['timesteps'][0]}, mixed batches in one call. The pipeline class "
        f"ships in this folder (`{PIPELINE_MODULE}.py`, imports only diffusers and torch), hence "
        f"`trust_remote_code=True`:\n\n"
        f"```python\nfrom diffusers import DiffusionPipeline\n\npipe = {remote_code_loading_call(folder)}\n"
        f'image = pipe("{example}", num_inference_steps=1, guidance_scale=1.0).images[0]\n```\n\n'
        f"| student | UNet | training prompts | updates |\n|---|---|---|---|\n{rows}\n"
    )
