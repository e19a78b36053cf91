"""Hierarchies shipped with vlweak, by name.

* ``"shapes"``: the built-in shapes world's three coarse classes over its 12 shapes
  (:data:`vlweak.data.world.SHAPE_HIERARCHY`).
* ``"cifar100"``: CIFAR-100's 20 superclasses over its 100 classes (names with spaces for
  underscores, as the data layer's :func:`~vlweak.data.clean_classname` gives them).
* ``"<dataset>-true"`` and ``"<dataset>-<n>"`` (n = 1, 5, 10, 15, 50): the label sets published with
  CHiLS (Novack et al., ICML 2023) in the repository acmi-lab/CHILS, shipped under the MIT License in
  ``vlweak/labels/builtin/`` (see ``LICENSE`` and ``LICENSE.NOTICE`` there). ``-true`` sets are known
  hierarchies (BREEDS, CIFAR-20 with the two vehicle classes merged, ...); ``-<n>`` sets were generated
  by a language model asking for n kinds of each class and are already cleaned as the paper describes.
  They are reproduced as published except that an entry repeated within one list is kept once and
  a sub-class naming another class of the same set is dropped from the list that borrows it
  (``fruits360-15`` lists "grapefruit" among the kinds of "grape", ``lsun-scene-10`` "living room"
  among the kinds of "dining room"): read as given, it would nest the other class, with all its
  sub-classes, inside the borrowing one, or, kept flat, send that class's images to the wrong parent.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from vlweak.labels.hierarchy import normalize_name
from vlweak.labels.hierarchy_errors import HierarchyFormatError

BUILTIN_DIR = Path(__file__).with_name("builtin")

CIFAR100_SUPERCLASSES: dict[str, list[str]] = {
    "aquatic mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit and vegetables": ["apple", "mushroom", "orange", "pear", "sweet pepper"],
    "household electrical devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large man-made outdoor things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large natural outdoor scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large omnivores and herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple tree", "oak tree", "palm tree", "pine tree", "willow tree"],
    "vehicles 1": ["bicycle", "bus", "motorcycle", "pickup truck", "train"],
    "vehicles 2": ["lawn mower", "rocket", "streetcar", "tank", "tractor"],
}


def _shapes() -> dict[str, list[str]]:
    from vlweak.data.world import SHAPE_HIERARCHY

    return {p: list(c) for p, c in SHAPE_HIERARCHY.items()}


_CODED = {"shapes": _shapes, "cifar100": lambda: {p: list(c) for p, c in CIFAR100_SUPERCLASSES.items()}}


@cache
def _published_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in BUILTIN_DIR.glob("*.json")))


def builtin_names() -> list[str]:
    """Every name :meth:`LabelHierarchy.builtin` accepts."""
    return sorted(_CODED) + list(_published_names())


def builtin_hint(name: str) -> str:
    """For a name that is no built-in: the built-ins near it (``did you mean ...?``), else all of them."""
    import difflib

    near = difflib.get_close_matches(name, builtin_names(), n=6, cutoff=0.7)
    return f"did you mean {' or '.join(map(repr, near))}?" if near else f"built-ins: {builtin_names()}"


def builtin_tree(name: str) -> dict[str, list[str]]:
    """The mapping ``{class: [sub-class, ...]}`` of a built-in hierarchy."""
    if name in _CODED:
        return _CODED[name]()
    if name not in _published_names():
        raise HierarchyFormatError(f"unknown built-in hierarchy {name!r}; {builtin_hint(name)}")
    with open(BUILTIN_DIR / f"{name}.json", encoding="utf-8") as f:
        data = json.load(f)
    classes = {normalize_name(p) for p in data}
    tree: dict[str, list[str]] = {}
    for parent, subs in data.items():
        seen = classes - {normalize_name(parent)}  # the other classes' names are dropped like repeats
        tree[parent] = [s for s in subs if not (normalize_name(s) in seen or seen.add(normalize_name(s)))]
    return tree
