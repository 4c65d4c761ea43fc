"""Export of students as diffusers pipelines / LoRA files, and reading exported folders back."""

from stepdistill.export.common import ExportError, merged_unet
from stepdistill.export.loading import load_pipeline, step_kwargs
from stepdistill.export.multi_student import export_multi_student
from stepdistill.export.students import (
    export_student,
    student_scheduler,
)

__all__ = ["ExportError", "export_multi_student", "export_student", "load_pipeline", "merged_unet", "step_kwargs",
           "student_scheduler"]
