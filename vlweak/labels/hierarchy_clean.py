"""CHiLS's cleaning of a sub-class set (Novack et al., 2023, Sec. 3, label set generation).

Sub-class names from a language model are often ambiguous on their own ("seal", "python", "ray");
CHiLS therefore (i) keeps the class name itself as one of its sub-classes and (ii) appends the class
name to every sub-class name that does not already contain it ("dolphin" -> "dolphin aquatic
mammals", while "clownfish" under "fish" stays as it is).
"""

from __future__ import annotations

from collections.abc import Iterable

from vlweak.labels.hierarchy import normalize_name

_STRIP = " \t\r\n.,;:!?\"'`*•-–—"


def clean_subclasses(
    parent: str,
    subclasses: Iterable[str],
    keep_parent: bool = True,
    append_parent: bool = True,
) -> list[str]:
    """The cleaned sub-class list of ``parent``.

    Each name is whitespace-collapsed and stripped of surrounding punctuation and quotes; empty
    names are dropped. With ``append_parent``, ``" <parent>"`` is appended to each name that does not
    contain the parent name (a case-insensitive substring test on :func:`normalize_name` forms, so
    "sunflowers" under "flowers" is kept as is). With ``keep_parent``, the parent name comes first.
    Duplicates (same :func:`normalize_name`) keep their first occurrence.
    """
    parent = " ".join(parent.split())
    pkey = normalize_name(parent)
    out: list[str] = [parent] if keep_parent else []
    seen = {pkey} if keep_parent else set()
    for raw in subclasses:
        name = " ".join(str(raw).split()).strip(_STRIP)
        if not name:
            continue
        if append_parent and pkey not in normalize_name(name):
            name = f"{name} {parent}"
        key = normalize_name(name)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out
