"""Prompts: template sets, the zero-shot text classifier, learnable prompt contexts."""

from vlweak.prompts.classifier import cached_text_classifier, text_classifier
from vlweak.prompts.templates import IMAGENET80, SIMPLE, TEMPLATE_SETS, resolve_templates

__all__ = ["IMAGENET80", "SIMPLE", "TEMPLATE_SETS", "cached_text_classifier", "resolve_templates", "text_classifier"]
from vlweak.prompts.learners import DualPromptLearner, TextPromptLearner, VisualPromptLearner  # noqa: E402

__all__ += ["DualPromptLearner", "TextPromptLearner", "VisualPromptLearner"]
