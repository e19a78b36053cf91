"""Prompt template sets and class-name cleaning."""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

#: CLIP's single default prompt.
SIMPLE: tuple[str, ...] = ("a photo of a {}.",)

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021), as format strings.
IMAGENET80: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"simple": SIMPLE, "imagenet80": IMAGENET80}


def resolve_templates(templates: str | list[str] | tuple[str, ...]) -> list[str]:
    """A template-set name (``simple``, ``imagenet80``) or a list of format strings with one ``{}``."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        if "{}" in templates:
            return [templates]
        raise ValueError(f"unknown template set {templates!r}; use one of {sorted(TEMPLATE_SETS)} or a list of strings with '{{}}'")
    out = list(templates)
    if not out:
        raise ValueError("the template list is empty")
    bad = [t for t in out if not isinstance(t, str) or t.count("{}") != 1 or not _formats(t)]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' placeholder and no other braces (write '{{{{' for a literal one); bad: {bad[:3]}")
    return out


def _formats(template: str) -> bool:
    try:
        template.format("x")
    except (ValueError, IndexError, KeyError):
        return False
    return True
