"""Workflows: distill, multi-student distillation and the demo, composing the layers below."""
