"""Prompt template sets and class-name cleaning."""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

#: CLIP's single default prompt.
SIMPLE: tuple[str, ...] = ("a photo of a {}.",)

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021), as format strings.
IMAGENET80: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"simple": SIMPLE, "imagenet80": IMAGENET80}


TEMPLATE_FILES = (".txt", ".json", ".yaml", ".yml")


def resolve_templates(templates: str | list[str] | tuple[str, ...]) -> list[str]:
    """A template-set name (``simple``, ``imagenet80``), one format string or a list of them, each with
    one ``{}``, or a file holding the list: ``.txt`` (one template per line; blank lines and lines
    starting with ``#`` skipped), ``.json`` / ``.yaml``."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        if templates.strip().lower().endswith(TEMPLATE_FILES):
            return resolve_templates(_read_template_file(templates))
        if templates.lstrip().startswith("["):
            raise ValueError(
                f"templates {templates!r} reads as one string, not a list: quote each template, as in "
                "'[\"a photo of a {}.\", \"a drawing of a {}.\"]' (in YAML braces need quotes)"
            )
        if "{" not in templates:
            raise ValueError(
                f"unknown template set {templates!r}; use one of {sorted(TEMPLATE_SETS)}, a list of strings "
                "with '{}', or a .txt / .json / .yaml file of them"
            )
        templates = [templates]
    out = list(templates)
    if not out:
        raise ValueError("the template list is empty")
    bad = [t for t in out if not isinstance(t, str) or t.count("{}") != 1 or not _formats(t)]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' placeholder and no other braces (write '{{{{' for a literal one); bad: {bad[:3]}")
    return out


def _read_template_file(name: str) -> list[str]:
    from pathlib import Path

    from vlweak.data.datasets import read_list_file  # the reader class-name files go through

    path = Path(name.strip()).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"template file not found: {path}")
    data = read_list_file(path)
    if not isinstance(data, list):
        raise ValueError(f"template file {path} holds a {type(data).__name__}: expected a list of templates")
    return data


def _formats(template: str) -> bool:
    try:
        template.format("x")
    except (ValueError, IndexError, KeyError):
        return False
    return True
