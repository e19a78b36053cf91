"""Multi-label annotation readers (COCO-style instances JSON, VOC-style XML) and their data modules.

Both readers give a :class:`MultiLabelImages` (a ``LabeledImages`` with ``multilabel=True``), so
label budgets (``label_fraction``, ``single_positive``), caching and every method work unchanged.
:func:`save_label_mask` writes the observation mask a budget drew for the train split, so a partial-
label run can be compared with (or reproduced from) another one.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from vlweak.data.datamodule import VLDataModule
from vlweak.data.datasets import (
    LabeledImages,
    VocabularyError,
    clean_classname,
    first_listings,
    load_classnames,
    validate_classnames,
    vocabulary_difference,
)

OnEmpty = Literal["error", "skip", "keep"]

#: PASCAL VOC's 20 classes: XML name -> class name used in prompts.
VOC_CLASSES: dict[str, str] = {
    "aeroplane": "aeroplane",
    "bicycle": "bicycle",
    "bird": "bird",
    "boat": "boat",
    "bottle": "bottle",
    "bus": "bus",
    "car": "car",
    "cat": "cat",
    "chair": "chair",
    "cow": "cow",
    "diningtable": "dining table",
    "dog": "dog",
    "horse": "horse",
    "motorbike": "motorbike",
    "person": "person",
    "pottedplant": "potted plant",
    "sheep": "sheep",
    "sofa": "sofa",
    "train": "train",
    "tvmonitor": "tv monitor",
}


class AnnotationError(ValueError):
    """An annotation file is malformed, empty, or refers to an unknown image or category (the
    message names the file and the entry)."""


class MultiLabelImages(LabeledImages):
    """Multi-label images whose annotation may leave entries unknown (e.g. VOC's ``difficult``
    objects): ``unknown[i]`` lists the class indices of item ``i`` that are neither positive nor
    negative; they are masked out of the item's ``mask``."""

    def __init__(
        self,
        paths: list[str],
        labels: list[list[int]],
        classnames: list[str],
        unknown: list[list[int]] | None = None,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(paths, labels, classnames, multilabel=True, skip_bad=skip_bad)
        self.unknown = unknown or [[] for _ in paths]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = super().__getitem__(index)
        if item is not None and self.unknown[index]:
            item["mask"][list(self.unknown[index])] = False
        return item

    def masks(self) -> torch.Tensor:
        m = super().masks()
        for i, unk in enumerate(self.unknown):
            m[i, list(unk)] = False
        return m


def _check_options(on_empty: str, difficult: str = "ignore") -> None:
    """Reader options are checked before any file is read (a typo must not wait for an empty image)."""
    if on_empty not in ("error", "skip", "keep"):
        raise ValueError(f"on_empty must be 'error', 'skip' or 'keep', got {on_empty!r}")
    if difficult not in ("ignore", "positive", "negative"):
        raise ValueError(f"difficult must be 'ignore', 'positive' or 'negative', got {difficult!r}")


def voc_class_map(classnames: dict[str, str] | list[str] | None) -> dict[str, str]:
    """``{xml name: class name}`` of VOC ``classnames``: ``None`` is VOC's 20 classes; an explicit
    empty list or map, or a repeated name, is a :class:`VocabularyError`."""
    if classnames is None:
        return dict(VOC_CLASSES)
    if len(classnames) == 0:
        raise VocabularyError("VOC classnames is empty: give the XML object names, or leave it unset for VOC's 20 classes")
    if isinstance(classnames, dict):
        return dict(classnames)
    names = validate_classnames(classnames, "VOC classnames")  # a repeated XML name is an error, not merged
    return {c: clean_classname(c) for c in names}


def _empty(on_empty: OnEmpty, where: str) -> bool:
    """``True`` to keep an image without labels; raises for ``error``."""
    if on_empty == "error":
        raise AnnotationError(f"{where} has no annotated object (on_empty='skip' drops such images, 'keep' keeps them as all-negative)")
    return on_empty == "keep"


class CocoReader:
    """COCO-style *instances* JSON: ``images`` (``id``, ``file_name``), ``categories`` (``id``,
    ``name``) and ``annotations`` (``image_id``, ``category_id``); an image's labels are the
    categories of its annotations. Category order (the class indices) follows ``categories``."""

    @staticmethod
    def read(
        annotation: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        classnames: list[str] | None = None,
        on_empty: OnEmpty = "error",
        skip_bad: bool = False,
        categories: list[str] | None = None,
    ) -> MultiLabelImages:
        """Args:
        annotation: the JSON file.
        image_root: folder ``file_name`` resolves against (default: the JSON's folder).
        classnames: expected class vocabulary (checked against the file's categories, in order,
            or against ``categories``).
        on_empty: images without annotations: ``error``, ``skip`` or ``keep`` (all negative).
        skip_bad: skip unreadable images at load time instead of failing.
        categories: keep only these categories (by name), as the classes in this order; the
            annotations of the others are dropped, so an image with none left is empty
            (``on_empty``). E.g. the 65 classes of COCO's 48 seen / 17 unseen zero-shot split.
        """
        _check_options(on_empty)
        path = Path(annotation).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: expected a JSON object with images, annotations, categories")
        for key in ("images", "categories"):
            if not data.get(key):
                raise AnnotationError(f"{path}: empty annotation: no {key!r} entries")
        cats = data["categories"]
        cat_index: dict[Any, int] = {}
        names = []
        for n, c in enumerate(cats):
            if "id" not in c or "name" not in c:
                raise AnnotationError(f"{path}: categories[{n}] needs 'id' and 'name', got {sorted(c)}")
            if c["id"] in cat_index:
                raise AnnotationError(f"{path}: categories[{n}] repeats category id {c['id']!r} ({c['name']!r})")
            cat_index[c["id"]] = len(names)
            names.append(clean_classname(str(c["name"])))
        names = validate_classnames(names, f"categories of {path}")
        if categories is not None:
            wanted = [clean_classname(c) for c in categories]
            unknown = [c for c in wanted if c not in names]
            if unknown:
                raise VocabularyError(f"categories {unknown[:5]} are not among the categories of {path} (e.g. {names[:5]})")
            if len(set(wanted)) != len(wanted) or not wanted:
                raise VocabularyError(f"categories must name distinct categories of {path}, got {list(categories)[:5]}...")
            remap = {names.index(c): k for k, c in enumerate(wanted)}
            cat_index = {cid: remap.get(i, -1) for cid, i in cat_index.items()}  # -1: dropped
            names = wanted
        if classnames is not None and [clean_classname(c) for c in classnames] != names:
            given = [clean_classname(c) for c in classnames]
            raise VocabularyError(f"categories of {path} differ from the given class names (under CocoDataModule, "
                                  f"the first split's): {vocabulary_difference(given, names)}; give the splits one category "
                                  "list, in one order (or `categories` to choose and order them)")
        images: dict[Any, str] = {}
        for n, im in enumerate(data["images"]):
            if "id" not in im or "file_name" not in im:
                raise AnnotationError(f"{path}: images[{n}] needs 'id' and 'file_name', got {sorted(im)}")
            if im["id"] in images:
                raise AnnotationError(f"{path}: images[{n}] repeats image id {im['id']!r} ({im['file_name']!r})")
            images[im["id"]] = im["file_name"]
        labels: dict[Any, set[int]] = {i: set() for i in images}
        for n, ann in enumerate(data.get("annotations") or []):
            if "image_id" not in ann or "category_id" not in ann:
                raise AnnotationError(f"{path}: annotations[{n}] needs 'image_id' and 'category_id', got {sorted(ann)}")
            if ann["image_id"] not in images:
                raise AnnotationError(f"{path}: annotations[{n}] refers to unknown image id {ann['image_id']!r}")
            if ann["category_id"] not in cat_index:
                raise AnnotationError(
                    f"{path}: annotations[{n}] has unknown category id {ann['category_id']!r} "
                    f"(known: {sorted(cat_index)[:10]}{'...' if len(cat_index) > 10 else ''})"
                )
            if cat_index[ann["category_id"]] >= 0:
                labels[ann["image_id"]].add(cat_index[ann["category_id"]])
        root = Path(image_root).expanduser() if image_root else path.parent
        paths, targets, listed = [], [], []
        for image_id, file_name in images.items():
            if not labels[image_id] and not _empty(on_empty, f"{path}: image id {image_id!r} ({file_name})"):
                continue
            paths.append(str(root / file_name))
            targets.append(sorted(labels[image_id]))
            listed.append(image_id)
        if not paths:
            raise AnnotationError(f"{path}: empty annotation: no image has an annotated object")
        if len(paths) < len(images):  # on_empty: skip (the usual practice): how many, said once
            rank_zero_info(f"{path}: {len(images) - len(paths)} of its {len(images)} images have no annotated object "
                           "(of the chosen categories) and are left out (on_empty: keep keeps them as all-negative)")
        keep = first_listings(paths, targets, lambda i: f"image id {listed[i]!r}", str(path))
        return MultiLabelImages([paths[i] for i in keep], [targets[i] for i in keep], names, skip_bad=skip_bad)


class VocReader:
    """VOC-style XML annotations: ``root/Annotations/<id>.xml`` with ``<filename>`` and
    ``<object><name>…</name><difficult>0|1</difficult></object>`` entries, images in
    ``root/JPEGImages``; the image ids of a split come from ``root/ImageSets/Main/<split>.txt``
    (default: every XML file)."""

    @staticmethod
    def read(
        root: str | os.PathLike,
        image_set: str | None = None,
        classnames: dict[str, str] | list[str] | None = None,
        difficult: Literal["ignore", "positive", "negative"] = "ignore",
        on_empty: OnEmpty = "error",
        skip_bad: bool = False,
    ) -> MultiLabelImages:
        """Args:
        root: the VOC folder (``Annotations``, ``JPEGImages``, ``ImageSets/Main``).
        image_set: split name (``trainval``, ``test``, …) read from ``ImageSets/Main``; ``None``: all XMLs.
        classnames: XML object names in class order, or ``{xml name: class name}``; default VOC's 20.
        difficult: classes present only as ``difficult`` objects are ``ignore``-d (unknown, the VOC
            protocol), counted ``positive``, or ``negative``.
        on_empty: an XML without objects: ``error``, ``skip`` or ``keep`` (all negative).
        skip_bad: skip unreadable images at load time instead of failing.
        """
        _check_options(on_empty, difficult)
        root = Path(root).expanduser()
        ann_dir = root / "Annotations"
        if not ann_dir.is_dir():
            raise FileNotFoundError(f"VOC annotation folder not found: {ann_dir}")
        mapping = voc_class_map(classnames)
        xml_names = list(mapping)
        names = validate_classnames(list(mapping.values()), "VOC class list")
        index = {n: k for k, n in enumerate(xml_names)}
        if image_set:
            listing = root / "ImageSets" / "Main" / f"{image_set}.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"VOC image set not found: {listing}")
            ids = [line.split()[0] for line in listing.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            if not ids:
                raise AnnotationError(f"{listing}: empty image set")
        else:
            ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
            if not ids:
                raise AnnotationError(f"{ann_dir}: empty annotation folder (no .xml files)")
        paths, labels, unknown, listed = [], [], [], []
        for image_id in ids:
            xml = ann_dir / f"{image_id}.xml"
            if not xml.is_file():
                raise FileNotFoundError(f"VOC annotation file not found: {xml}")
            try:
                tree = ET.parse(xml).getroot()
            except ET.ParseError as err:
                raise AnnotationError(f"{xml}: invalid XML ({err})") from err
            pos, hard = set(), set()
            for n, obj in enumerate(tree.findall("object")):
                name = (obj.findtext("name") or "").strip()
                if name not in index:
                    raise AnnotationError(
                        f"{xml}: object {n} has unknown class {name!r} (known: {xml_names[:6]}...)"
                    )
                is_hard = (obj.findtext("difficult") or "0").strip() == "1"
                (hard if is_hard else pos).add(index[name])
            if difficult == "positive":
                pos |= hard
            hard -= pos
            if difficult != "ignore":
                hard = set()
            if not pos and not hard and not _empty(on_empty, str(xml)):
                continue
            file_name = (tree.findtext("filename") or f"{image_id}.jpg").strip()
            image = root / "JPEGImages" / file_name
            if not Path(file_name).suffix and not image.is_file():  # some tools write the id alone
                image = image.with_name(f"{file_name}.jpg")
            paths.append(str(image))
            labels.append(sorted(pos))
            unknown.append(sorted(hard))
            listed.append(image_id)
        if not paths:
            raise AnnotationError(f"{ann_dir}: empty annotation: no image has an annotated object")
        keep = first_listings(paths, list(zip(labels, unknown)), lambda i: f"image id {listed[i]!r}",
                              str(listing if image_set else ann_dir))
        return MultiLabelImages([paths[i] for i in keep], [labels[i] for i in keep], names,
                                unknown=[unknown[i] for i in keep], skip_bad=skip_bad)


# ---------------------------------------------------------------------------- data modules
class CocoDataModule(VLDataModule):
    """COCO-style multi-label data from ``instances_*.json`` annotation files.

    E.g. MS-COCO 2014: train on ``instances_train2014.json``, evaluate on ``instances_val2014.json``,
    as DualCoOp does.

    Args:
        train: instances JSON of the train split.
        test: instances JSON of the test split.
        val: instances JSON of the validation split (default: the test file).
        train_images: image folder of the train split (default: the JSON's folder).
        val_images: image folder of the validation split (default: ``test_images`` when ``val`` is unset).
        test_images: image folder of the test split (default: the JSON's folder).
        on_empty: images without annotations: ``skip`` (the usual multi-label practice), ``keep``
            (all negative) or ``error``.
        categories: keep only these categories (names), as the classes in this order; the others'
            annotations are dropped (e.g. the 65 classes of the 48 seen / 17 unseen zero-shot split
            DualCoOp evaluates on, ``recipes/dualcoop/coco_zeroshot_unseen.yaml``). Default: all.
        **kwargs: see :class:`~vlweak.data.VLDataModule` (batch size, ``label_fraction``,
            ``single_positive``, ``budget_seed``, ...).
    """

    def __init__(
        self,
        train: str | None = None,
        test: str | None = None,
        val: str | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        test_images: str | None = None,
        on_empty: OnEmpty = "skip",
        categories: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if val is None and test is not None:
            val, val_images = test, val_images or test_images
        self.files = {s: (f, im) for s, f, im in (("train", train, train_images), ("val", val, val_images), ("test", test, test_images)) if f}
        if not self.files:
            raise ValueError("CocoDataModule needs at least one of train, val, test")
        self.on_empty = on_empty
        self.categories = None if categories is None else list(categories)
        first, images = next(iter(self.files.values()))
        self._classnames = CocoReader.read(first, images, on_empty=on_empty, categories=self.categories).classnames
        self.check_options()

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    @property
    def multilabel(self) -> bool:
        return True

    def build_split(self, split: str) -> MultiLabelImages | None:
        if split not in self.files:
            return None
        f, images = self.files[split]
        return CocoReader.read(f, images, self._classnames, self.on_empty, self.skip_bad, self.categories)


class VocDataModule(VLDataModule):
    """VOC-style multi-label data (e.g. PASCAL VOC 2007: train on ``trainval``, test on ``test``).

    Args:
        root: the VOC folder (``Annotations``, ``JPEGImages``, ``ImageSets/Main``).
        train: train image set (``ImageSets/Main/<name>.txt``; ``null`` to skip).
        test: test image set.
        val: validation image set (default: the test set).
        classnames: XML object names in class order or ``{xml name: class name}`` (default VOC's 20,
            with readable names such as "potted plant"), or a ``.txt`` / ``.json`` / ``.yaml`` file
            holding either; an empty list or a repeated name is an error.
        difficult: classes present only as difficult objects: ``ignore`` (unknown), ``positive`` or ``negative``.
        on_empty: images without objects: ``error``, ``skip`` or ``keep``.
        **kwargs: see :class:`~vlweak.data.VLDataModule`.
    """

    def __init__(
        self,
        root: str,
        train: str | None = "trainval",
        test: str | None = "test",
        val: str | None = None,
        classnames: dict[str, str] | list[str] | str | None = None,
        difficult: Literal["ignore", "positive", "negative"] = "ignore",
        on_empty: OnEmpty = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        classnames = load_classnames(classnames)
        _check_options(on_empty, difficult)
        self.root = Path(root).expanduser()
        if not (self.root / "Annotations").is_dir():
            raise FileNotFoundError(f"VOC annotation folder not found: {self.root / 'Annotations'}")
        self.sets = {"train": train, "val": val or test, "test": test}
        self.classname_map, self.difficult, self.on_empty = classnames, difficult, on_empty
        mapping = voc_class_map(classnames)
        self._classnames = validate_classnames(list(mapping.values()), "VOC class list")
        self.check_options()

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    @property
    def multilabel(self) -> bool:
        return True

    def build_split(self, split: str) -> MultiLabelImages | None:
        image_set = self.sets.get(split)
        if image_set is None:
            return None
        return VocReader.read(self.root, image_set, self.classname_map, self.difficult, self.on_empty, self.skip_bad)


# ---------------------------------------------------------------------------- saved masks
def save_label_mask(datamodule: Any, path: str | os.PathLike, split: str = "train") -> Path | None:
    """Write the observation mask a label budget drew for ``split`` (``None`` if that split has no
    budget): ``<path>`` (safetensors: ``mask`` bool ``[N, C]``, ``observed_targets`` with ``-1`` on
    unknown entries) plus ``<path>.json`` (budget, class names, sample ids). Written atomically."""
    from vlweak.data.budget import Budgeted
    from vlweak.data.cache import atomic_save_tensors

    ds = datamodule.raw(split) if hasattr(datamodule, "raw") else None
    if not isinstance(ds, Budgeted) or not ds.multilabel:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask, targets = ds.masks().bool(), ds.true_targets()
    observed = torch.where(mask, targets.float(), torch.full_like(targets.float(), -1.0))
    b = ds.budget
    meta = {
        "split": split,
        "budget": {"fraction": b.fraction, "single_positive": b.single_positive, "seed": b.seed},
        "classnames": list(getattr(ds, "classnames", datamodule.classnames)),
        "sample_ids": [str(s) for s in getattr(ds, "sample_ids", range(len(ds)))],
        "observed_fraction": float(mask.float().mean()),
    }
    # safetensors itself creates files 0600; the atomic writer gives the usual permissions
    atomic_save_tensors({"mask": mask.to(torch.uint8), "observed_targets": observed}, path)
    meta_path = path.with_name(path.name + ".json")
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    return path


def load_label_mask(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a mask written by :func:`save_label_mask`: ``(mask [N, C] bool, metadata)``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label mask not found: {path}")
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    return load_file(str(path))["mask"].bool(), meta
