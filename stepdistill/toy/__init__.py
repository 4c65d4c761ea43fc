"""The embedded toy world (prompts, images, attributes), its teacher's and evaluator's networks and the evaluator's
features as an image embedding."""

from stepdistill.toy import world
from stepdistill.toy.embedder import ToyEmbedder

__all__ = ["ToyEmbedder", "world"]
