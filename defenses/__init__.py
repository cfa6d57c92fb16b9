"""Training objectives, each a small composable piece; ``Recipe`` puts them together."""

from bulwark.defenses.recipe import Recipe, StepOutput

__all__ = ["Recipe", "StepOutput"]
