"""Bad data-module inputs fail early (construction or ``setup``) with a message naming the input;
legitimate but surprising ones (empty class folders, classes short of ``shots``) warn."""

from __future__ import annotations

import re

import pytest

from tests.conftest import write_image_folder
from vlweak.data import ImageFolderDataModule, ShapesWorld, ShapesWorldDataModule, ShapesWorldDataset, VocabularyError
from vlweak.data.datasets import ImageFolderReader, validate_classnames
from vlweak.data.multilabel import VocDataModule


def _identity(x):
    return x


def _splits(root, names=("train", "test"), classes=None):
    for name in names:
        write_image_folder(root / name, classes or {"cat": 2, "dog": 2}, size=4)
    return root


# ---------------------------------------------------------------------------- split folders
def test_named_split_folder_missing_fails_at_construction(tmp_path):
    root = _splits(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / 'tst'} not found (found: test, train)")):
        ImageFolderDataModule(str(root), test="tst")
    # none of the named folders exist: no silent fallback to "the root is the test split"
    with pytest.raises(FileNotFoundError, match=r"training, .*testing not found \(found: test, train\)"):
        ImageFolderDataModule(str(root), train="training", test="testing")
    # a renamed folder that exists is fine
    (root / "test").rename(root / "testing")
    dm = ImageFolderDataModule(str(root), test="testing", val=None)
    assert set(dm.split_dirs) == {"train", "test"}


def test_default_split_folder_missing_fails_at_setup(tmp_path):
    root = _splits(tmp_path, names=("train",))
    dm = ImageFolderDataModule(str(root), transform=_identity)  # fit needs only train/
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4
    with pytest.raises(FileNotFoundError, match=re.escape(f"split folder {root / 'test'} not found (found: train)")):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match=re.escape(f"split folder {root / 'val'} not found")):
        dm.setup("validate")


def test_predict_split_folder_missing_names_that_split(tmp_path):
    root = _splits(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(root / 'val'))} not found .*predict_split 'val'"):
        ImageFolderDataModule(str(root), predict_split="val")
    with pytest.raises(FileNotFoundError, match="no 'val' split for predict_split 'val': val is null"):
        ImageFolderDataModule(str(root), val=None, predict_split="val")
    dm = ImageFolderDataModule(str(root), val=None, predict_split="train", transform=_identity)
    dm.setup("predict")
    assert len(dm.datasets["predict"]) == 4


def test_flat_root_is_still_the_test_split(tmp_path):
    flat = write_image_folder(tmp_path / "flat", {"cat": 2, "dog": 1}, size=4)
    dm = ImageFolderDataModule(str(flat), transform=_identity)
    assert dm.split_dirs == {"test": flat} and dm.classnames == ["cat", "dog"]
    dm.setup("test")
    assert len(dm.datasets["test"]) == 3
    with pytest.raises(FileNotFoundError, match=r"flat.val not found \(found: cat, dog\); .*used whole as the test split"):
        dm.setup("validate")
    # split folders under other names are not mistaken for class folders
    nested = _splits(tmp_path / "nested", names=("training", "testing"))
    with pytest.raises(FileNotFoundError, match=r"split folders .* not found \(found: testing, training\)"):
        ImageFolderDataModule(str(nested))


def test_empty_class_folder_warns(tmp_path):
    root = _splits(tmp_path)
    (root / "train" / "star").mkdir()
    (root / "test" / "star").mkdir()
    with pytest.warns(UserWarning, match=re.escape(str(root / "train" / "star"))):
        ImageFolderReader.read(root / "train")
    with pytest.warns(UserWarning, match=re.escape(str(root / "train" / "star"))):
        dm = ImageFolderDataModule(str(root), val=None)
    assert dm.classnames == ["cat", "dog", "star"]  # the class stays in the vocabulary
    with pytest.warns(UserWarning, match=re.escape(str(root / "test" / "star"))):
        assert len(dm.raw("test")) == 4


def test_class_folder_missing_from_a_split_is_named(tmp_path):
    root = _splits(tmp_path, classes={"cat": 1, "dog": 1, "fox": 1})
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    (root / "test" / "dog").rmdir()
    write_image_folder(root / "test", {"owl": 1}, size=4)
    train, test = root / "train", root / "test"
    dm = ImageFolderDataModule(str(root), val=None)
    with pytest.raises(ValueError, match=re.escape(f"class folders of {test} differ from those of {train}: "
                                                  f"{test} lacks ['dog'] (present in {train}); "
                                                  f"{test} has ['owl'], which {train} lacks")):
        dm.raw("test")
    # with a class list the count differs too: the folders are still the message, not the count
    named = ImageFolderDataModule(str(root), val=None, classnames=["Cat", "Dog", "Fox"])
    with pytest.raises(ValueError, match=re.escape(f"{test} lacks ['dog']")):
        named.raw("test")
    (root / "test" / "owl" / "0.png").unlink()
    (root / "test" / "owl").rmdir()
    with pytest.raises(ValueError, match=re.escape(f"{test} lacks ['dog'] (present in {train}) (every split")):
        ImageFolderDataModule(str(root), val=None, classnames=["Cat", "Dog", "Fox"]).raw("test")
    (root / "test" / "dog").mkdir()  # an empty folder keeps the class: a warning, not an error
    with pytest.warns(UserWarning, match="no images"):
        assert len(ImageFolderDataModule(str(root), val=None).raw("test")) == 2


# ---------------------------------------------------------------------------- the shapes world
def test_world_unknown_split_lists_the_valid_ones():
    dm = ShapesWorldDataModule(n_train=4, n_val=0, n_test=4)
    for call in (lambda: dm.raw("trian"), lambda: dm.build_split("trian"), lambda: dm.sample_ids("trian")):
        with pytest.raises(ValueError, match=r"no 'trian' split \(splits: train, val, test"):
            call()
    with pytest.raises(ValueError, match=r"no 'trian' split \(splits: train, val, test"):
        ShapesWorld().scene("trian", 0)
    with pytest.raises(ValueError, match="no 'trian' split"):
        ShapesWorldDataset(ShapesWorld(), "trian", 2)
    assert dm.raw("val") is None  # a known but empty split is still just absent
    with pytest.raises(RuntimeError, match=r"no 'val' split \(n_val: 0\)"):
        ShapesWorldDataModule(n_train=4, n_val=0, n_test=4, transform=_identity).setup("validate")


# ---------------------------------------------------------------------------- label budgets
def test_shots_above_class_size_warns_and_keeps_all(tmp_path):
    root = _splits(tmp_path, classes={"cat": 3, "dog": 1, "fox": 5})
    dm = ImageFolderDataModule(str(root), val=None, shots=4)
    with pytest.warns(UserWarning, match=r"shots=4 but 2 of 3 classes .*: cat \(3\), dog \(1\)$"):
        train = dm.raw("train")
    assert (train.targets() >= 0).sum() == 3 + 1 + 4


def test_seen_classes_empty_and_single_positive_on_single_label(tmp_path):
    root = _splits(tmp_path)
    with pytest.raises(ValueError, match="seen_classes is empty"):
        ImageFolderDataModule(str(root), seen_classes=[])
    with pytest.raises(ValueError, match="single_positive.*single-label"):
        ImageFolderDataModule(str(root), single_positive=True)
    with pytest.raises(ValueError, match="single_positive.*single-label"):
        ShapesWorldDataModule(single_positive=True)
    assert ShapesWorldDataModule(multilabel=True, single_positive=True).budget.single_positive


# ---------------------------------------------------------------------------- class lists
def test_empty_and_duplicate_classnames(tmp_path):
    root = _splits(tmp_path)
    for empty in ([], {}):
        with pytest.raises(VocabularyError, match="classnames .* is empty"):
            ImageFolderDataModule(str(root), classnames=empty)
    with pytest.raises(VocabularyError, match=r"duplicate class names: \['dog'\]"):
        ImageFolderDataModule(str(root), classnames=["dog", "dog"])
    assert ImageFolderDataModule(str(root), classnames=None).classnames == ["cat", "dog"]
    # a blank name would give the prompt "a photo of a ."
    for blank in ("", "  "):
        with pytest.raises(VocabularyError, match=re.escape(f"blank class names ({blank!r} at position 1)")):
            ImageFolderDataModule(str(root), classnames=["cat", blank])
    blank_in_map = f"classes of {root / 'train'} has blank class names ('' at position 1)"
    with pytest.raises(VocabularyError, match=re.escape(blank_in_map)):
        ImageFolderDataModule(str(root), classnames={"cat": "cat", "dog": ""})
    # names that differ only by surrounding whitespace are one class twice
    with pytest.raises(VocabularyError, match=re.escape("differ only by surrounding whitespace ('star' at position 0, "
                                                        "'star ' at position 2)")):
        validate_classnames(["star", "dog", "star "])
    with pytest.raises(VocabularyError, match=re.escape("whitespace (' dog' at position 0, 'dog' at position 1)")):
        ImageFolderDataModule(str(root), classnames=[" dog", "dog"])
    with pytest.raises(VocabularyError, match=re.escape("duplicate class names: ['dog'] ('dog' at position 0, "
                                                        "'dog' at position 2)")):
        validate_classnames(["dog", "cat", "dog"])
    assert validate_classnames(["tabby cat", "cat"]) == ["tabby cat", "cat"]

    (tmp_path / "voc" / "Annotations").mkdir(parents=True)
    voc = str(tmp_path / "voc")
    for empty in ([], {}):
        with pytest.raises(VocabularyError, match="VOC classnames is empty"):
            VocDataModule(voc, classnames=empty)
    with pytest.raises(VocabularyError, match=r"duplicate class names: \['dog'\]"):
        VocDataModule(voc, classnames=["dog", "dog"])
    assert len(VocDataModule(voc).classnames) == 20


def test_budget_short_classes_only_among_seen_and_single_positive_needs_multilabel():
    import torch

    from vlweak.data import Budgeted, LabelBudget

    class Toy:
        multilabel, classnames = False, ["a", "b", "c"]

        def targets(self):
            return torch.tensor([0, 0, 0, 1, 2, 2, 2])

        def __len__(self):
            return 7

    with pytest.warns(UserWarning, match=r"1 of 3 classes .*: b \(1\)$"):
        Budgeted(Toy(), LabelBudget(shots=2))
    import warnings

    with warnings.catch_warnings():  # b is unseen: its labels are hidden anyway, no warning
        warnings.simplefilter("error")
        Budgeted(Toy(), LabelBudget(shots=2, seen=(0, 2)))
    with pytest.raises(ValueError, match="single_positive.*single-label"):
        Budgeted(Toy(), LabelBudget(single_positive=True))


def _flat_images(folder, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    for k in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(folder / f"img{k}.jpg")


def test_a_folder_of_images_without_class_folders_is_unlabeled_and_needs_the_vocabulary(tmp_path):
    _flat_images(tmp_path / "photos", 3)
    with pytest.raises(VocabularyError, match=r"photos holds 3 images but no class sub-folders: .*give classnames"):
        ImageFolderDataModule(root=str(tmp_path / "photos"))
    dm = ImageFolderDataModule(root=str(tmp_path / "photos"), classnames=["cat", "dog"], transform=_identity)
    dm.setup("predict")
    ds = dm.datasets["predict"]
    assert dm.classnames == ["cat", "dog"] and [ds[k]["label"] for k in range(3)] == [-1, -1, -1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(VocabularyError, match="empty has no class sub-folders and no images"):
        ImageFolderDataModule(root=str(tmp_path / "empty"), classnames=["cat"])


def test_an_unlabeled_train_pool_beside_a_labelled_test_split_takes_its_vocabulary(tmp_path):
    # ZLaP's or unsupervised prompt tuning's layout: root/train/*.jpg (the pool), root/test/<class>/
    _flat_images(tmp_path / "train", 4)
    write_image_folder(tmp_path / "test", {"cat": 1, "dog": 2})
    dm = ImageFolderDataModule(root=str(tmp_path), val=None, transform=_identity)
    dm.setup("fit")
    dm.setup("test")
    assert dm.classnames == ["cat", "dog"]
    assert [dm.datasets["train"][k]["label"] for k in range(4)] == [-1] * 4
    assert [dm.datasets["test"][k]["label"] for k in range(3)] == [0, 1, 1]


def test_auto_loader_workers_share_the_machine_among_the_node_processes():
    from types import SimpleNamespace

    from vlweak.data.datamodule import auto_loader_workers
    from vlweak.data.extract import auto_workers

    dm = ShapesWorldDataModule(n_train=0, n_val=0, n_test=4, num_workers="auto", transform=lambda im: im)
    assert dm.num_workers == 0  # resolved at setup, when the trainer is known
    dm.setup("test")
    assert dm.num_workers == auto_workers()
    assert auto_loader_workers(SimpleNamespace(num_devices=4)) == auto_workers() // 4
    for bad in ("many", -1, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"num_workers must be a non-negative integer or 'auto', got {bad!r}")):
            ShapesWorldDataModule(num_workers=bad)
