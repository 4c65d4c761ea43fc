"""Models: the frozen teacher, the generators (one class per student kind), EMA and the router."""

from stepdistill.models.conditioning import PromptEmbeds, unet_forward
from stepdistill.models.generators import (
           GENERATOR_KINDS,
           Generator,
           PhasedGenerator,
           TeacherSamplerGenerator,
)
from stepdistill.models.router import KeywordRouter
from stepdistill.models.teacher import Teacher

__all__ = ["GENERATOR_KINDS", "Generator", "KeywordRouter", "PhasedGenerator", "PromptEmbeds", "Teacher",
           "TeacherSamplerGenerator", "unet_forward"]
