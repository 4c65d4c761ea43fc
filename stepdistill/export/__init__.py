"""Export of students as diffusers pipelines / LoRA files."""

from stepdistill.export.common import ExportError, merged_unet
from stepdistill.export.students import (
    export_student,
    student_scheduler,
)

__all__ = ["ExportError", "export_student", "merged_unet", "student_scheduler"]
