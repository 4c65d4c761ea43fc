"""Export of students as diffusers pipelines / LoRA files: one exporter per student kind
(:data:`stepdistill.export.students.EXPORTERS`), the routed multi-student folder, weight merging, and reading
exported folders back."""

from stepdistill.export.common import ExportError, merged_unet
from stepdistill.export.schedulers import student_scheduler
from stepdistill.export.students import EXPORTERS, export_student

__all__ = ["EXPORTERS", "ExportError", "export_student", "merged_unet", "student_scheduler"]
