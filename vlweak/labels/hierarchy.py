"""Label hierarchies: classes with sub-classes, over one or more levels.

A :class:`LabelHierarchy` is a forest of names read from a mapping (inline YAML in a recipe), a
JSON/YAML file ``{"parent": ["child", ...]}`` or a CSV of ``parent,child`` edges. It is viewed at one
*level* (0 = the roots): the nodes at that depth are the classes ("parents"), the leaves beneath
each are its sub-classes. Methods ask it for the sub-class list and for the sub-class -> parent map as
tensors, in the order of the dataset's class vocabulary.

Input shapes accepted for a mapping (they can be mixed):

* flat: ``{"polygon": ["triangle", "square"], "curved shape": ["circle"]}``;
* nested: ``{"animal": {"mammal": ["dog", "cat"], "bird": ["owl"]}}``, or list items that are
  one-key mappings: ``{"animal": ["fish", {"mammal": ["dog"]}]}``;
* linked flat (adjacency lists, like CSV edges): a key listed as a child elsewhere is placed under
  that parent: ``{"animal": ["mammal", "bird"], "mammal": ["dog"], "bird": ["owl"]}``.

Names are stripped and whitespace-collapsed. Two names are *the same name* when they agree after
underscores become spaces and case is folded (``"Sweet_pepper"`` == ``"sweet pepper"``); the first
spelling is kept. Rules (each a :mod:`~vlweak.labels.hierarchy_errors` error):

* a name listed under two different parents is a :class:`MultipleParentsError`, unless
  ``duplicates="qualify"``: then a *leaf* shared by several parents becomes one sub-class per parent,
  named ``"<leaf> <parent>"`` (the same "append the parent" form CHiLS uses for its label sets);
  an inner node under two parents is always an error;
* a name listed twice under the same parent is a :class:`DuplicateNameError`;
* an empty sub-class list (``[]``, or a class with nothing beneath it) is an
  :class:`EmptySubclassesError`;
* a child named like its own parent is allowed and is a leaf (CHiLS keeps the class name itself
  among its sub-classes);
* cycles, non-string names, a level no class reaches, or a branch ending above the chosen level are
  :class:`HierarchyFormatError`;
* :meth:`LabelHierarchy.for_vocabulary` raises :class:`UnknownParentError` for a parent that is not
  in the dataset's vocabulary (and, with ``missing="error"``, for a vocabulary class the hierarchy
  does not cover).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vlweak.labels.hierarchy_errors import (
    DuplicateNameError,
    EmptySubclassesError,
    HierarchyFormatError,
    MultipleParentsError,
    UnknownParentError,
)

Duplicates = Literal["error", "qualify"]
Missing = Literal["error", "self"]


def normalize_name(name: str) -> str:
    """The identity of a name: one Unicode form (NFC: a name typed on one system matches a folder
    name from another), underscores to spaces, whitespace collapsed, case folded."""
    return " ".join(unicodedata.normalize("NFC", name).replace("_", " ").split()).casefold()


def _display(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise HierarchyFormatError(f"{where}: names must be strings, got {name!r} ({type(name).__name__})")
    text = " ".join(name.split())
    if not text:
        raise HierarchyFormatError(f"{where}: empty name")
    return text


@dataclass(frozen=True)
class _Node:
    name: str
    children: tuple["_Node", ...] = ()


# ---------------------------------------------------------------------------------------- parsing
_EMPTY = object()  # marks a parent declared with an empty sub-class list
_LEAF = object()  # marks a name declared with no children (YAML ``name:`` / ``None``)


def _edges_from_mapping(tree: Mapping[str, Any], where: str) -> list[tuple[str, Any]]:
    """Flatten any accepted mapping shape into ordered ``(parent, child)`` edges."""
    if not isinstance(tree, Mapping):
        raise HierarchyFormatError(f"{where}: a hierarchy is a mapping parent -> children, got {type(tree).__name__}")
    edges: list[tuple[str, Any]] = []

    def visit(parent: Any, value: Any) -> None:
        parent = _display(parent, where)
        if value is None:
            edges.append((parent, _LEAF))
        elif isinstance(value, str):
            edges.append((parent, _display(value, where)))
        elif isinstance(value, Mapping):
            if not value:
                edges.append((parent, _EMPTY))
            for key, sub in value.items():
                edges.append((parent, _display(key, where)))
                visit(key, sub)
        elif isinstance(value, Sequence):
            if not value:
                edges.append((parent, _EMPTY))
            for item in value:
                if isinstance(item, Mapping):
                    for key, sub in item.items():
                        edges.append((parent, _display(key, where)))
                        visit(key, sub)
                else:
                    edges.append((parent, _display(item, where)))
        else:
            raise HierarchyFormatError(
                f"{where}: children of {parent!r} must be a list or mapping, got {type(value).__name__}"
            )

    for key, value in tree.items():
        visit(key, value)
    return edges


def _build_forest(edges: Iterable[tuple[str, Any]], duplicates: Duplicates, where: str) -> tuple[_Node, ...]:
    if duplicates not in ("error", "qualify"):
        raise ValueError(f"duplicates must be 'error' or 'qualify', got {duplicates!r}")
    display: dict[str, str] = {}
    children: dict[str, list[str]] = {}
    parents_of: dict[str, list[str]] = {}
    empty: list[str] = []
    declared_leaf: list[str] = []

    def key_of(name: str) -> str:
        k = normalize_name(name)
        display.setdefault(k, name)
        return k

    for parent, child in edges:
        p = key_of(parent)
        if child is _LEAF:
            declared_leaf.append(p)
            continue
        kids = children.setdefault(p, [])
        if child is _EMPTY:
            empty.append(display[p])
            continue
        c = key_of(child)
        if c in kids:
            raise DuplicateNameError(f"{where}: {display[c]!r} is listed twice under {display[p]!r}")
        kids.append(c)
        if c != p:
            parents_of.setdefault(c, []).append(p)
    empty += [display[k] for k in declared_leaf if k not in children and k not in parents_of]
    if empty:
        raise EmptySubclassesError(f"{where}: empty sub-class list for {sorted(set(empty))}")

    for c, ps in list(parents_of.items()):
        if len(ps) < 2:
            continue
        names = [display[p] for p in ps]
        if duplicates == "error" or children.get(c):
            hint = "" if children.get(c) else " (duplicates: qualify, a CHiLS / ZLaP option, names it '<child> <parent>' under each)"
            raise MultipleParentsError(f"{where}: {display[c]!r} is listed under several parents {names}{hint}")
        for p in ps:  # qualify a shared leaf: one sub-class per parent, "<leaf> <parent>"
            q = key_of(f"{display[c]} {display[p]}")
            if q in parents_of or q in children or q in children[p]:
                raise DuplicateNameError(f"{where}: qualified name {display[q]!r} is already taken")
            children[p][children[p].index(c)] = q
            parents_of[q] = [p]
        del parents_of[c]

    roots = [k for k in children if k not in parents_of]
    done: set[str] = set()

    def build(k: str, path: tuple[str, ...]) -> _Node:
        if k in path:
            raise HierarchyFormatError(f"{where}: cycle through {[display[x] for x in path + (k,)]}")
        done.add(k)
        kids = tuple(_Node(display[c]) if c == k else build(c, path + (k,)) for c in children.get(k, []))
        return _Node(display[k], kids)

    forest = tuple(build(r, ()) for r in roots)
    unreached = [display[k] for k in children if k not in done]
    if unreached or (children and not roots):
        raise HierarchyFormatError(f"{where}: cycle among {unreached or [display[k] for k in children]}")
    if not forest:
        raise EmptySubclassesError(f"{where}: the hierarchy has no classes")
    return forest


def _leaves(node: _Node) -> list[str]:
    if not node.children:
        return [node.name]
    return [leaf for child in node.children for leaf in _leaves(child)]


def _depth(node: _Node) -> int:
    return 1 + max((_depth(c) for c in node.children), default=0)


def two_level(tree: Mapping[str, Sequence[str]], source: str, duplicates: Duplicates = "qualify") -> "LabelHierarchy":
    """A hierarchy of exactly these classes, each over its listed sub-classes, read as two levels
    (no name links one class below another, as a nested file's would): a sub-class named like
    another class belongs to that class and is dropped from this one's list, as the published sets
    drop such repeats (a class left with none is its own sub-class); a sub-class listed under several
    classes is qualified, ``"<sub-class> <class>"``, with ``duplicates="qualify"``, else an error."""
    if duplicates not in ("error", "qualify"):
        raise ValueError(f"duplicates must be 'error' or 'qualify', got {duplicates!r}")
    where = source
    classes = [_display(c, where) for c in tree]
    keys = [normalize_name(c) for c in classes]
    if len(set(keys)) != len(keys):
        raise DuplicateNameError(f"{where}: class names repeat among {classes}")
    lists: dict[str, list[str]] = {}
    class_keys = set(keys)
    for parent, key in zip(classes, keys):
        kept: dict[str, str] = {}
        for sub in (_display(sub, where) for sub in tree[parent]):
            k = normalize_name(sub)
            if k == key or k not in class_keys:
                kept.setdefault(k, sub)
        lists[parent] = list(kept.values()) or [parent]
    owners: dict[str, list[str]] = {}
    for parent, subs in lists.items():
        for sub in subs:
            owners.setdefault(normalize_name(sub), []).append(parent)
    for k, parents in owners.items():
        if len(parents) < 2:
            continue
        if duplicates == "error":
            raise MultipleParentsError(f"{where}: sub-class {k!r} is listed under several classes {parents}")
        for parent in parents:
            subs = lists[parent]
            i = next(j for j, sub in enumerate(subs) if normalize_name(sub) == k)
            subs[i] = f"{subs[i]} {parent}"
    forest = tuple(_Node(p, tuple(_Node(sub) for sub in subs)) for p, subs in lists.items())
    return LabelHierarchy._from_forest(forest, 0, source)


def _few(names: Sequence[str], n: int = 10) -> str:
    """A list for a message, cut after ``n`` names (a 1,000-class vocabulary is not spelled out)."""
    return f"{list(names[:n])}{f' and {len(names) - n} more' if len(names) > n else ''}"


def _near(theirs: Sequence[str], ours: Sequence[str]) -> str:
    """Close spellings between two lists of names (``'trees' ~ 'tree'``), for a message."""
    import difflib

    keys = {normalize_name(o): o for o in ours}
    pairs = []
    for t in theirs:
        close = difflib.get_close_matches(normalize_name(t), list(keys), n=1, cutoff=0.75)
        if close:
            pairs.append(f"{t!r} ~ {keys[close[0]]!r}")
    return f" (close: {', '.join(pairs[:6])})" if pairs else " (a misspelled class on either side?)"


# ---------------------------------------------------------------------------------------- the type
class LabelHierarchy:
    """Classes with their sub-classes, viewed at one level of a (possibly deeper) tree.

    Args:
        tree: mapping parent -> children (see the module docstring for the accepted shapes).
        level: depth of the nodes used as classes (0 = the roots); their sub-classes are the leaves
            beneath them.
        duplicates: ``"error"`` (default) or ``"qualify"``: what to do with a leaf listed under two
            parents (see the module docstring).
        source: a label for error messages (a file name, "recipe", ...).
    """

    def __init__(
        self,
        tree: Mapping[str, Any],
        level: int = 0,
        duplicates: Duplicates = "error",
        source: str = "hierarchy",
    ) -> None:
        forest = _build_forest(_edges_from_mapping(tree, source), duplicates, source)
        self._setup(forest, level, source)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_forest(cls, forest: tuple[_Node, ...], level: int, source: str) -> "LabelHierarchy":
        self = cls.__new__(cls)
        self._setup(forest, level, source)
        return self

    def _setup(self, forest: tuple[_Node, ...], level: int, source: str) -> None:
        self._forest = forest
        self.source = source
        self.depth = max(_depth(r) for r in forest)
        if not isinstance(level, int) or not 0 <= level < self.depth - 1:
            raise HierarchyFormatError(
                f"{source}: level {level!r} out of range; this hierarchy has class levels 0..{self.depth - 2}"
            )
        self.level = level
        classes: list[_Node] = []

        def collect(node: _Node, depth: int) -> None:
            if not node.children:  # a leaf at or above the class level: no sub-classes below it
                raise HierarchyFormatError(
                    f"{source}: branch {node.name!r} ends at depth {depth}, not below class level {level}"
                )
            if depth == level:
                classes.append(node)
            else:
                for child in node.children:
                    collect(child, depth + 1)

        for root in forest:
            collect(root, 0)
        self._children: dict[str, list[str]] = {}
        self._parent_of: dict[str, str] = {}
        seen: dict[str, str] = {}
        for node in classes:
            if not node.children:
                raise EmptySubclassesError(f"{source}: class {node.name!r} has no sub-classes at level {level}")
            if normalize_name(node.name) in {normalize_name(p) for p in self._children}:
                raise DuplicateNameError(f"{source}: class name {node.name!r} appears twice")
            leaves = _leaves(node)
            for leaf in leaves:
                k = normalize_name(leaf)
                if k in seen:
                    raise MultipleParentsError(f"{source}: sub-class {leaf!r} is under {seen[k]!r} and {node.name!r}")
                seen[k] = node.name
                self._parent_of[leaf] = node.name
            self._children[node.name] = leaves

    # ------------------------------------------------------------------ loaders
    @classmethod
    def from_edges(
        cls,
        edges: Iterable[tuple[str, str]],
        level: int = 0,
        duplicates: Duplicates = "error",
        source: str = "edges",
    ) -> "LabelHierarchy":
        """From ``(parent, child)`` pairs; an empty child declares an empty sub-class list."""
        clean: list[tuple[str, Any]] = []
        for i, edge in enumerate(edges):
            if len(edge) != 2:
                raise HierarchyFormatError(f"{source}: edge {i} must be (parent, child), got {edge!r}")
            parent, child = edge
            where = f"{source}: edge {i}"
            clean.append((_display(parent, where), _EMPTY if not str(child).strip() else _display(child, where)))
        return cls._from_forest(_build_forest(clean, duplicates, source), level, source)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, level: int = 0, duplicates: Duplicates = "error") -> "LabelHierarchy":
        """From a CSV of ``parent,child`` rows (an optional ``parent,child`` header; ``#`` comments)."""
        edges = []
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if len(row) != 2:
                    raise HierarchyFormatError(f"{path}:{lineno}: expected 'parent,child', got {row!r}")
                if not edges and [c.strip().lower() for c in row] == ["parent", "child"]:
                    continue
                edges.append((row[0], row[1]))
        if not edges:
            raise HierarchyFormatError(f"{path}: no edges")
        return cls.from_edges(edges, level, duplicates, source=str(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike, level: int = 0, duplicates: Duplicates = "error") -> "LabelHierarchy":
        """From a ``.json``, ``.yaml``/``.yml`` (mapping) or ``.csv`` (edges) file."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return cls.from_csv(path, level, duplicates)
        if suffix not in (".json", ".yaml", ".yml"):
            raise HierarchyFormatError(f"{path}: unknown hierarchy file type {suffix!r} (use .json, .yaml, .yml or .csv)")
        if not path.is_file():
            raise FileNotFoundError(f"hierarchy file not found: {path}")
        with open(path, encoding="utf-8-sig") as f:
            if suffix == ".json":
                try:
                    data = json.load(f)
                except json.JSONDecodeError as err:
                    raise HierarchyFormatError(f"{path}: invalid JSON: {err}") from err
            else:
                import yaml

                try:
                    data = yaml.safe_load(f)
                except yaml.YAMLError as err:
                    raise HierarchyFormatError(f"{path}: invalid YAML: {err}") from err
        return cls(data, level=level, duplicates=duplicates, source=str(path))

    @classmethod
    def builtin(cls, name: str, level: int = 0) -> "LabelHierarchy":
        """A hierarchy shipped with vlweak by name (see :mod:`~vlweak.labels.hierarchy_builtin`).

        Published generated sets sometimes list one leaf under two classes; those are qualified
        (``duplicates="qualify"``)."""
        from vlweak.labels.hierarchy_builtin import builtin_tree

        return cls(builtin_tree(name), level=level, duplicates="qualify", source=f"builtin:{name}")

    @classmethod
    def resolve(
        cls, spec: "LabelHierarchy | Mapping[str, Any] | str | os.PathLike", level: int = 0,
        duplicates: Duplicates = "error",
    ) -> "LabelHierarchy":
        """What a recipe gives (an inline mapping, a built-in name or a file path) as a hierarchy;
        ``duplicates`` applies to a mapping or a file (built-in sets are qualified already)."""
        if isinstance(spec, LabelHierarchy):
            return spec if spec.level == level else spec.at_level(level)
        if isinstance(spec, Mapping):
            return cls(spec, level=level, duplicates=duplicates, source="inline hierarchy")
        from vlweak.labels.hierarchy_builtin import builtin_hint, builtin_names

        if isinstance(spec, str) and spec in builtin_names():
            return cls.builtin(spec, level=level)
        if not isinstance(spec, (str, os.PathLike)):
            raise HierarchyFormatError(
                f"a hierarchy is a mapping {{class: [sub-class, ...]}}, a built-in name or a file path; got a "
                f"{type(spec).__name__} ({str(spec)[:80]})"
            )
        if Path(spec).expanduser().is_file():
            return cls.from_file(Path(spec).expanduser(), level=level, duplicates=duplicates)
        raise HierarchyFormatError(
            f"hierarchy {str(spec)!r} is neither a file nor a built-in name; {builtin_hint(str(spec))}"
        )

    # ------------------------------------------------------------------ views
    @property
    def parents(self) -> list[str]:
        """The classes at the chosen level, in tree order."""
        return list(self._children)

    @property
    def subclasses(self) -> list[str]:
        """All sub-classes (leaves), grouped by parent in :attr:`parents` order."""
        return [s for subs in self._children.values() for s in subs]

    def subclasses_of(self, parent: str) -> list[str]:
        return list(self._children[self._lookup(parent)])

    def parent_of(self, subclass: str) -> str:
        key = normalize_name(subclass)
        for s, p in self._parent_of.items():
            if normalize_name(s) == key:
                return p
        raise KeyError(f"{subclass!r} is not a sub-class of this hierarchy")

    def as_dict(self) -> dict[str, list[str]]:
        """The two-level view ``{parent: [sub-class, ...]}`` at the chosen level."""
        return {p: list(s) for p, s in self._children.items()}

    def to_tree(self) -> dict[str, Any]:
        """The full forest as a nested mapping (leaves as lists), whatever the level."""

        def enc(node: _Node) -> Any:
            if all(not c.children for c in node.children):
                return [c.name for c in node.children]
            return [c.name if not c.children else {c.name: enc(c)} for c in node.children]

        return {r.name: enc(r) for r in self._forest}

    def at_level(self, level: int) -> "LabelHierarchy":
        """The same tree viewed at another level."""
        return LabelHierarchy._from_forest(self._forest, level, self.source)

    def _lookup(self, parent: str) -> str:
        key = normalize_name(parent)
        for p in self._children:
            if normalize_name(p) == key:
                return p
        raise KeyError(f"{parent!r} is not a class of this hierarchy; classes: {self.parents}")

    def _ancestors(self, name: str) -> list[str]:
        """The names above the first node called ``name`` (normalized) in the tree, root first;
        empty when it is a root or absent."""
        key = normalize_name(name)

        def find(node: _Node, above: list[str]) -> list[str] | None:
            if normalize_name(node.name) == key:
                return above
            for child in node.children:
                if (found := find(child, [*above, node.name])) is not None:
                    return found
            return None

        for root in self._forest:
            if (found := find(root, [])) is not None:
                return found
        return []

    # ------------------------------------------------------------------ the dataset's vocabulary
    def for_vocabulary(self, classnames: Sequence[str], missing: Missing = "error") -> "LabelHierarchy":
        """A two-level hierarchy whose parents are exactly ``classnames``, in that order and spelling.

        Names are matched with :func:`normalize_name`. Hierarchy parents absent from the vocabulary are
        left out when every vocabulary class is found (a dataset of some of the hierarchy's classes),
        else they are an :class:`UnknownParentError` naming close spellings; a vocabulary class
        absent from the hierarchy is one too with ``missing="error"``, or becomes its own single
        sub-class with ``missing="self"``.
        """
        if missing not in ("error", "self"):
            raise ValueError(f"missing must be 'error' or 'self', got {missing!r}")
        vocab = {normalize_name(c): c for c in classnames}
        if len(vocab) != len(classnames):
            raise DuplicateNameError(f"class vocabulary has duplicate names: {list(classnames)}")
        mine = {normalize_name(p): p for p in self._children}
        unknown = [p for k, p in mine.items() if k not in vocab]
        if unknown and all(k in mine for k in vocab):
            # every dataset class found: a dataset of some of the hierarchy's classes (a 10-class subset
            # of CIFAR-100 with its published sets) takes theirs and leaves the others out
            logging.getLogger(__name__).info(
                "%s: the dataset's %d classes are %d of its %d; the others are left out", self.source, len(vocab),
                len(vocab), len(mine))
            mine = {k: p for k, p in mine.items() if k in vocab}
            unknown = []
        if unknown:
            level = self._level_holding(list(vocab))
            unmatched = [c for k, c in vocab.items() if k not in mine]
            hint = (
                f"; the dataset's classes are the hierarchy's level {level}: pass hierarchy_level: {level}"
                if level is not None else
                f"; dataset classes the hierarchy lacks: {_few(unmatched)}{_near(unknown, unmatched)}"
            )
            raise UnknownParentError(
                f"{self.source}: {len(unknown)} of its {len(mine)} classes are not among the dataset's "
                f"{len(vocab)}: {_few(unknown)}{hint}"
            )
        absent = [c for k, c in vocab.items() if k not in mine]
        if absent and missing == "error":
            nested = [f"{c!r} lies below {' > '.join(map(repr, path))}" for c in absent if (path := self._ancestors(c))]
            hint = (
                f"; {', '.join(nested)} in the hierarchy (a name listed as a sub-class is nested there, "
                "so it cannot also be a class at this level)"
                if nested else ""
            )
            raise UnknownParentError(
                f"{self.source}: dataset classes {_few(absent)} have no sub-classes in the hierarchy "
                f"(add them, or pass missing='self' to use each such class as its own sub-class){hint}"
            )
        tree = {c: self._children[mine[k]] if k in mine else [c] for k, c in vocab.items()}
        out = two_level(tree, self.source)
        assert out.parents == list(classnames), (out.parents, list(classnames))
        return out

    def _level_holding(self, keys: list[str]) -> int | None:
        """Another class level of the tree whose classes include every one of ``keys`` (normalized)."""
        for level in range(self.depth - 1):
            if level != self.level and set(keys) <= {normalize_name(p) for p in self.at_level(level).parents}:
                return level
        return None

    def subclass_to_parent(self, classnames: Sequence[str] | None = None) -> Tensor:
        """``LongTensor [n_subclasses]``: index of each sub-class's parent in ``classnames`` (default:
        :attr:`parents`). Sub-classes are in the order of ``for_vocabulary(classnames).subclasses``."""
        h = self if classnames is None else self.for_vocabulary(classnames)
        index = {p: i for i, p in enumerate(h.parents)}
        return torch.tensor([index[h._parent_of[s]] for s in h.subclasses], dtype=torch.long)

    def membership(self, classnames: Sequence[str] | None = None) -> Tensor:
        """``BoolTensor [n_parents, n_subclasses]``: ``True`` where the sub-class is under the parent."""
        mapping = self.subclass_to_parent(classnames)
        n = len(self) if classnames is None else len(classnames)
        return torch.nn.functional.one_hot(mapping, n).T.bool()

    # ------------------------------------------------------------------ transforms and output
    def cleaned(self, keep_parent: bool = True, append_parent: bool = True) -> "LabelHierarchy":
        """The two-level view with CHiLS's cleaning applied to every sub-class list
        (see :func:`~vlweak.labels.hierarchy_clean.clean_subclasses`)."""
        from vlweak.labels.hierarchy_clean import clean_subclasses

        tree = {p: clean_subclasses(p, s, keep_parent, append_parent) for p, s in self._children.items()}
        return two_level(tree, self.source)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the full tree (re-readable with :meth:`from_file`), atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_tree(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def __len__(self) -> int:
        return len(self._children)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelHierarchy) and self._forest == other._forest and self.level == other.level

    def __repr__(self) -> str:
        return (
            f"LabelHierarchy({len(self)} classes, {len(self._parent_of)} sub-classes, "
            f"level {self.level} of depth {self.depth}, source={self.source!r})"
        )
