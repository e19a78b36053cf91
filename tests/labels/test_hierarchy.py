"""LabelHierarchy: readers, levels, vocabulary mapping, validation errors, built-ins, cleaning."""

from __future__ import annotations

import json

import pytest
import torch

from vlweak.data.world import COARSE, SHAPE_HIERARCHY, SHAPES
from vlweak.labels.hierarchy import LabelHierarchy
from vlweak.labels.hierarchy_builtin import CIFAR100_SUPERCLASSES, builtin_names, builtin_tree
from vlweak.labels.hierarchy_clean import clean_subclasses
from vlweak.labels.hierarchy_errors import (
    DuplicateNameError,
    EmptySubclassesError,
    HierarchyError,
    HierarchyFormatError,
    MultipleParentsError,
    UnknownParentError,
)

TREE = {"animal": {"mammal": ["dog", "cat"], "bird": ["owl", "bird"]}, "plant": {"tree": ["oak", "pine"]}}


def test_two_level_from_dict():
    h = LabelHierarchy({"fruit": ["apple", "pear"], "tool": ["saw"]})
    assert h.parents == ["fruit", "tool"]
    assert h.subclasses == ["apple", "pear", "saw"]
    assert h.parent_of("Pear") == "fruit"
    assert h.subclass_to_parent().tolist() == [0, 0, 1]
    assert h.membership().tolist() == [[True, True, False], [False, False, True]]


def test_multi_level_and_levels():
    h = LabelHierarchy(TREE)
    assert h.depth == 3 and h.level == 0
    assert h.as_dict() == {"animal": ["dog", "cat", "owl", "bird"], "plant": ["oak", "pine"]}
    h1 = h.at_level(1)
    assert h1.as_dict() == {"mammal": ["dog", "cat"], "bird": ["owl", "bird"], "tree": ["oak", "pine"]}
    assert h1.parent_of("bird") == "bird"  # a child named like its own parent is a leaf
    with pytest.raises(HierarchyFormatError):
        h.at_level(2)  # leaves cannot be classes


def test_linked_flat_mapping_equals_nested():
    flat = {"animal": ["mammal", "bird"], "mammal": ["dog", "cat"], "bird": ["owl", "bird"], "plant": ["tree"], "tree": ["oak", "pine"]}
    assert LabelHierarchy(flat) == LabelHierarchy(TREE)
    assert LabelHierarchy(flat, level=1).as_dict() == LabelHierarchy(TREE, level=1).as_dict()


def test_branch_ending_above_level():
    with pytest.raises(HierarchyFormatError, match="ends at depth"):
        LabelHierarchy({"animal": {"mammal": ["dog"]}, "plant": ["oak"]}, level=1)


def test_json_yaml_csv_files(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps(TREE))
    (tmp_path / "h.yaml").write_text(
        "animal:\n  mammal: [dog, cat]\n  bird: [owl, bird]\nplant:\n  tree: [oak, pine]\n"
    )
    edges = [("animal", "mammal"), ("animal", "bird"), ("mammal", "dog"), ("mammal", "cat"), ("bird", "owl"),
             ("bird", "bird"), ("plant", "tree"), ("tree", "oak"), ("tree", "pine")]
    (tmp_path / "h.csv").write_text("parent,child\n# comment\n" + "".join(f"{p},{c}\n" for p, c in edges))
    ref = LabelHierarchy(TREE, level=1)
    for name in ("h.json", "h.yaml", "h.csv"):
        h = LabelHierarchy.from_file(tmp_path / name, level=1)
        assert h.as_dict() == ref.as_dict(), name
    assert LabelHierarchy.resolve(str(tmp_path / "h.csv")).as_dict() == LabelHierarchy(TREE).as_dict()
    # to_json round-trips the whole tree
    LabelHierarchy(TREE).to_json(tmp_path / "out.json")
    assert LabelHierarchy.from_file(tmp_path / "out.json") == LabelHierarchy(TREE)


def test_bad_files(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,c\n")
    with pytest.raises(HierarchyFormatError):
        LabelHierarchy.from_file(tmp_path / "bad.csv")
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(HierarchyFormatError):
        LabelHierarchy.from_file(tmp_path / "bad.txt")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(HierarchyFormatError):
        LabelHierarchy.from_file(tmp_path / "list.json")
    with pytest.raises(HierarchyFormatError, match="built-in"):
        LabelHierarchy.resolve("no-such-hierarchy")


def test_child_under_two_parents():
    with pytest.raises(MultipleParentsError, match="seal"):
        LabelHierarchy({"aquatic mammal": ["seal", "whale"], "office tool": ["stapler", "seal"]})
    # the documented rule for duplicates across parents: qualify each with its parent's name
    h = LabelHierarchy({"aquatic mammal": ["seal", "whale"], "office tool": ["stapler", "seal"]}, duplicates="qualify")
    assert h.as_dict() == {"aquatic mammal": ["seal aquatic mammal", "whale"], "office tool": ["stapler", "seal office tool"]}
    # an inner node under two parents is always an error
    with pytest.raises(MultipleParentsError):
        LabelHierarchy({"a": ["x"], "b": ["x"], "x": ["y"]}, duplicates="qualify")
    with pytest.raises(MultipleParentsError):
        LabelHierarchy.from_edges([("a", "x"), ("b", "x")])


def test_empty_and_duplicates_and_cycles():
    with pytest.raises(EmptySubclassesError):
        LabelHierarchy({"a": ["x"], "b": []})
    with pytest.raises(EmptySubclassesError):
        LabelHierarchy({"a": ["x"], "b": None})
    with pytest.raises(EmptySubclassesError):
        LabelHierarchy.from_edges([("a", "x"), ("b", "")])
    with pytest.raises(DuplicateNameError):
        LabelHierarchy({"a": ["x", "X"]})  # same name after case folding
    with pytest.raises(DuplicateNameError):
        LabelHierarchy({"a": ["sweet_pepper", "sweet pepper"]})
    with pytest.raises(HierarchyFormatError, match="cycle"):
        LabelHierarchy({"a": ["b"], "b": ["a"]})
    with pytest.raises(HierarchyFormatError):
        LabelHierarchy({"a": ["x", 3]})
    assert issubclass(MultipleParentsError, HierarchyError) and issubclass(HierarchyError, ValueError)


def test_vocabulary_mapping_and_errors():
    h = LabelHierarchy({"fruit": ["apple", "pear"], "tool": ["saw"]})
    v = h.for_vocabulary(["Tool", "fruit"])  # dataset order and spelling win
    assert v.parents == ["Tool", "fruit"] and v.subclasses == ["saw", "apple", "pear"]
    assert h.subclass_to_parent(["Tool", "fruit"]).tolist() == [0, 1, 1]
    assert h.membership(["Tool", "fruit"]).shape == (2, 3)
    # a dataset of some of the hierarchy's classes takes theirs (a subset of a published set)
    assert h.for_vocabulary(["fruit"]).as_dict() == {"fruit": ["apple", "pear"]}
    with pytest.raises(UnknownParentError, match=r"1 of its 2 classes are not among the dataset's 2: \['tool'\]; dataset classes the hierarchy lacks: \['tools'\] \(close: 'tool' ~ 'tools'\)"):
        h.for_vocabulary(["fruit", "tools"])  # a parent that is not in the dataset's vocabulary
    with pytest.raises(UnknownParentError, match="vehicle"):
        h.for_vocabulary(["fruit", "tool", "vehicle"])
    assert h.for_vocabulary(["fruit", "tool", "vehicle"], missing="self").subclasses[-1] == "vehicle"
    with pytest.raises(DuplicateNameError):
        h.for_vocabulary(["fruit", "Fruit", "tool"])


def test_builtins():
    shapes = LabelHierarchy.builtin("shapes")
    assert shapes.as_dict() == SHAPE_HIERARCHY and sorted(shapes.subclasses) == sorted(SHAPES)
    assert shapes.subclass_to_parent(COARSE).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    cifar = LabelHierarchy.builtin("cifar100")
    assert len(cifar) == 20 and len(cifar.subclasses) == 100 and cifar.as_dict() == CIFAR100_SUPERCLASSES
    assert torch.bincount(cifar.subclass_to_parent()).tolist() == [5] * 20
    true = LabelHierarchy.builtin("cifar20-true")  # published: 19 classes, vehicles merged
    assert len(true) == 19 and sorted(true.subclasses) == sorted(cifar.subclasses)
    gen = LabelHierarchy.builtin("cifar20-10")
    assert all(gen.subclasses_of(p)[0] == p for p in gen.parents)  # cleaned: parent kept first
    assert {"shapes", "cifar100", "cifar20-true", "living17-5", "resisc45-50"} <= set(builtin_names())
    # a name one typo off is suggested; a list is not a hierarchy and is named as such
    with pytest.raises(HierarchyFormatError, match=r"unknown built-in hierarchy 'shape'; did you mean 'shapes'\?"):
        LabelHierarchy.builtin("shape")
    with pytest.raises(HierarchyFormatError, match=r"'cifar-100' is neither a file nor a built-in name; did you mean 'cifar100'"):
        LabelHierarchy.resolve("cifar-100")
    with pytest.raises(HierarchyFormatError, match=r"a mapping \{class: \[sub-class, ...\]\}, a built-in name or a file path; got a list"):
        LabelHierarchy.resolve(["cat", "dog"])
    for name in builtin_names():  # every shipped set loads, with every class it was published with
        tree = builtin_tree(name)
        assert LabelHierarchy.builtin(name).parents == list(tree), name
    # a generated set lists another class among a class's kinds: it stays a class of its own
    fruits = LabelHierarchy.builtin("fruits360-15")
    assert "grapefruit" in fruits.parents and fruits.parent_of("grapefruit") == "grapefruit"
    assert "grapefruit" not in fruits.subclasses_of("grape")
    scenes = LabelHierarchy.builtin("lsun-scene-10")
    assert scenes.parent_of("living room") == "living room" and "living room" not in scenes.subclasses_of("dining room")


def test_inline_recipe_resolve():
    h = LabelHierarchy.resolve({"polygon": ["triangle"], "symbol": ["star"]})
    assert h.parents == ["polygon", "symbol"]
    assert LabelHierarchy.resolve("shapes") == LabelHierarchy.builtin("shapes")
    assert LabelHierarchy.resolve(LabelHierarchy(TREE), level=1).level == 1


def test_clean_subclasses_paper_rule():
    out = clean_subclasses("fish", ["clownfish", "tuna", " Salmon. ", "salmon", "", "fish", "1"])
    assert out == ["fish", "clownfish", "tuna fish", "Salmon fish", "1 fish"]
    assert clean_subclasses("flowers", ["sunflowers", "roses"]) == ["flowers", "sunflowers", "roses flowers"]
    assert clean_subclasses("aquatic mammals", ["dolphin"], keep_parent=False) == ["dolphin aquatic mammals"]
    assert clean_subclasses("x", ["a"], append_parent=False) == ["x", "a"]
    h = LabelHierarchy({"fish": ["tuna"], "bird": ["owl"]}).cleaned()
    assert h.as_dict() == {"fish": ["fish", "tuna fish"], "bird": ["bird", "owl bird"]}


def test_dataset_class_nested_as_a_subclass_is_named_with_its_place():
    # "symbol" is listed under "polygon", so the linked-flat reading nests it there
    h = LabelHierarchy.resolve({"polygon": ["triangle", "symbol"], "curved shape": ["circle"], "symbol": ["star"]})
    with pytest.raises(UnknownParentError, match="'symbol' lies below 'polygon'"):
        h.for_vocabulary(["polygon", "curved shape", "symbol"])


def test_a_dataset_class_listed_as_another_classs_subclass_stays_a_class_of_its_own():
    # missing: self gives such a class itself as sub-class; the other class's list no longer holds it
    h = LabelHierarchy({"pepper": ["bell pepper", "jalapeno"], "chili": ["habanero"]})
    mapped = h.for_vocabulary(["pepper", "bell pepper", "chili"], missing="self")
    assert mapped.parents == ["pepper", "bell pepper", "chili"]
    assert mapped.as_dict() == {"pepper": ["jalapeno"], "bell pepper": ["bell pepper"], "chili": ["habanero"]}
    assert mapped.subclass_to_parent().tolist() == [0, 1, 2]
    # cleaning that turns a sub-class into another class's name ("bell" -> "bell pepper") keeps both classes
    cleaned = LabelHierarchy({"pepper": ["bell", "jalapeno"], "bell pepper": ["red bell pepper"]}).cleaned()
    assert cleaned.as_dict() == {"pepper": ["pepper", "jalapeno pepper"], "bell pepper": ["bell pepper", "red bell pepper"]}
    assert cleaned.for_vocabulary(["pepper", "bell pepper"]).parents == ["pepper", "bell pepper"]


def test_hierarchy_names_files_and_paths_as_users_write_them(tmp_path, monkeypatch):
    import unicodedata

    # a decomposed "Café" (as macOS writes names) is the composed folder name
    decomposed = unicodedata.normalize("NFD", "Café")
    h = LabelHierarchy({decomposed: ["espresso bar"], "diner": ["truck stop"]})
    assert h.for_vocabulary([unicodedata.normalize("NFC", "Café"), "diner"]).parents == ["Café", "diner"]
    # a spreadsheet's byte-order mark before the header
    (tmp_path / "h.csv").write_text("\ufeffparent,child\ncafé,espresso bar\ndiner,truck stop\n", encoding="utf-8")
    assert LabelHierarchy.from_file(tmp_path / "h.csv").parents == ["café", "diner"]
    # ~ in a path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert LabelHierarchy.resolve("~/h.csv").parents == ["café", "diner"]


def test_unknown_classes_are_named_briefly_with_close_spellings_and_the_level_that_holds_them():
    big = [f"class {i}" for i in range(1000)]
    h = LabelHierarchy({**{c: [f"{c} sub"] for c in big[:-1]}, "trees": ["oak"]})
    with pytest.raises(UnknownParentError) as err:
        h.for_vocabulary(big[:-2] + ["tree", "class 998"])
    message = str(err.value)
    assert len(message) < 600 and "'trees' ~ 'tree'" in message and "dataset classes the hierarchy lacks: ['tree']" in message
    # the dataset's classes are the tree's second level
    deep = LabelHierarchy({"animal": {"mammal": ["dog"], "bird": ["owl"]}, "plant": {"tree": ["oak"]}})
    with pytest.raises(UnknownParentError, match="the dataset's classes are the hierarchy's level 1: pass hierarchy_level: 1"):
        deep.for_vocabulary(["mammal", "bird", "tree"])
