"""Export of students as diffusers pipelines / LoRA files."""

from stepdistill.pipelines.export import ExportError, export_student, merged_unet, student_scheduler

__all__ = ["ExportError", "export_student", "merged_unet", "student_scheduler"]
