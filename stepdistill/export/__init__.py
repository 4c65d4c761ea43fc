"""Export of students as diffusers pipelines / LoRA files: one exporter per student kind
(:data:`stepdistill.export.students.EXPORTERS`), the routed multi-student folder, weight merging, and reading
exported folders back."""

from stepdistill.export.common import ExportError, merged_unet
from stepdistill.export.loading import load_pipeline, step_kwargs
from stepdistill.export.multi_student import export_multi_student
from stepdistill.export.schedulers import student_scheduler
from stepdistill.export.students import EXPORTERS, export_student

__all__ = ["EXPORTERS", "ExportError", "export_multi_student", "export_student", "load_pipeline", "merged_unet",
           "step_kwargs", "student_scheduler"]
