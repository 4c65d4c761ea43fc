"""Models: the frozen teacher, the generators (one class per student kind), EMA and the router."""

from stepdistill.models.generators import Generator, TeacherSamplerGenerator
from stepdistill.models.router import KeywordRouter
from stepdistill.models.teacher import Teacher, unet_forward

__all__ = ["Generator", "KeywordRouter", "Teacher", "TeacherSamplerGenerator", "unet_forward"]
