"""COCO-style JSON and VOC-style XML readers, their data modules, bad-input errors, saved masks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlweak.data import CocoDataModule, VocDataModule
from vlweak.data.datasets import VocabularyError
from vlweak.data.multilabel import AnnotationError, CocoReader, VocReader, load_label_mask, save_label_mask


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def write_coco(root: Path, annotations: list | None = None, images: list | None = None) -> Path:
    images = images if images is not None else [{"id": i, "file_name": f"img{i}.png"} for i in (1, 2, 3, 4)]
    for im in images:
        _png(root / "images" / im["file_name"], im["id"])
    data = {
        "images": images,
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "traffic_light"}, {"id": 7, "name": "dog"}],
        "annotations": annotations
        if annotations is not None
        else [
            {"image_id": 1, "category_id": 1},
            {"image_id": 1, "category_id": 7},
            {"image_id": 1, "category_id": 7},
            {"image_id": 2, "category_id": 3},
            {"image_id": 4, "category_id": 1},
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def write_voc(root: Path, objects: dict[str, list[tuple[str, int]]], sets: dict[str, list[str]] | None = None) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for k, (image_id, objs) in enumerate(objects.items()):
        _png(root / "JPEGImages" / f"{image_id}.png", k)
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename>{body}</annotation>"
        )
    for name, ids in (sets or {}).items():
        (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


# ------------------------------------------------------------------------------------------ COCO
def test_coco_reader_targets(tmp_path):
    path = write_coco(tmp_path)
    ds = CocoReader.read(path, tmp_path / "images", on_empty="skip")
    assert ds.multilabel and ds.classnames == ["person", "traffic light", "dog"]
    assert len(ds) == 3  # image 3 has no annotation and is skipped
    assert ds.targets().tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]
    item = ds[0]
    assert item["target"].tolist() == [1, 0, 1] and item["mask"].all() and item["image"].size == (8, 8)
    keep = CocoReader.read(path, tmp_path / "images", on_empty="keep")
    assert len(keep) == 4 and keep.targets()[2].sum() == 0


def test_coco_categories_keep_a_subset_in_the_given_order(tmp_path):
    path = write_coco(tmp_path)
    ds = CocoReader.read(path, tmp_path / "images", on_empty="skip", categories=["dog", "person"])
    assert ds.classnames == ["dog", "person"]
    # image 2 had only a traffic light (dropped, now empty, skipped); image 3 had nothing
    assert [Path(p).name for p in ds.paths] == ["img1.png", "img4.png"]
    assert ds.targets().tolist() == [[1, 1], [0, 1]]
    dm = CocoDataModule(train=str(path), test=str(path), train_images=str(tmp_path / "images"),
                        test_images=str(tmp_path / "images"), categories=["dog", "person"])
    assert dm.classnames == ["dog", "person"] and dm.raw("test").targets().tolist() == [[1, 1], [0, 1]]
    with pytest.raises(VocabularyError, match=r"categories \['cat'\] are not among the categories of .*instances.json"):
        CocoReader.read(path, tmp_path / "images", categories=["dog", "cat"])
    with pytest.raises(VocabularyError, match="distinct"):
        CocoDataModule(train=str(path), categories=["dog", "dog"])


def test_coco_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoReader.read(tmp_path / "missing.json")
    bad_cat = write_coco(tmp_path / "a", annotations=[{"image_id": 1, "category_id": 99}])
    with pytest.raises(AnnotationError, match=r"instances\.json: annotations\[0\] has unknown category id 99"):
        CocoReader.read(bad_cat)
    bad_img = write_coco(tmp_path / "b", annotations=[{"image_id": 42, "category_id": 1}])
    with pytest.raises(AnnotationError, match=r"annotations\[0\] refers to unknown image id 42"):
        CocoReader.read(bad_img)
    no_images = write_coco(tmp_path / "c", images=[], annotations=[])
    with pytest.raises(AnnotationError, match="empty annotation: no 'images'"):
        CocoReader.read(no_images)
    empty_image = write_coco(tmp_path / "d")
    with pytest.raises(AnnotationError, match=r"image id 3 \(img3.png\) has no annotated object"):
        CocoReader.read(empty_image, on_empty="error")
    nothing = write_coco(tmp_path / "e", annotations=[])
    with pytest.raises(AnnotationError, match="no image has an annotated object"):
        CocoReader.read(nothing, on_empty="skip")
    twice = write_coco(tmp_path / "f", images=[{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}])
    with pytest.raises(AnnotationError, match=r"images\[1\] repeats image id 1 \('b.png'\)"):
        CocoReader.read(twice)
    cats = write_coco(tmp_path / "g")
    data = json.loads(cats.read_text())
    data["categories"].append({"id": 7, "name": "cat"})
    cats.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"categories\[3\] repeats category id 7 \('cat'\)"):
        CocoReader.read(cats)
    # a misspelt option fails before any image is looked at, even where no image is empty
    full = write_coco(tmp_path / "h", annotations=[{"image_id": i, "category_id": 7} for i in (1, 2, 3, 4)])
    with pytest.raises(ValueError, match="on_empty must be .* got 'Skip'"):
        CocoReader.read(full, on_empty="Skip")
    with pytest.raises(ValueError, match="on_empty must be .* got 'drop'"):
        CocoDataModule(train=str(full), on_empty="drop")
    # another split's file listing the same categories in another order: said so, not just "differ"
    with pytest.raises(VocabularyError, match="differ from the given class names .*: same names, different order"):
        CocoReader.read(full, classnames=["dog", "person", "traffic light"])
    with pytest.raises(VocabularyError, match=r"missing \['cat'\], extra \['dog'\]"):
        CocoReader.read(full, classnames=["person", "traffic light", "cat"])


def test_coco_datamodule_and_saved_mask(tmp_path):
    path = write_coco(tmp_path)
    dm = CocoDataModule(
        train=str(path), test=str(path), train_images=str(tmp_path / "images"), test_images=str(tmp_path / "images"),
        label_fraction=0.5, budget_seed=3, batch_size=2, transform=lambda im: torch.zeros(3, 4, 4),
    )
    assert dm.multilabel and dm.classnames == ["person", "traffic light", "dog"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == batch["mask"].shape == (2, 3)
    saved = save_label_mask(dm, tmp_path / "run" / "mask.safetensors")
    mask, meta = load_label_mask(saved)
    assert torch.equal(mask, dm.raw("train").masks())
    assert meta["budget"] == {"fraction": 0.5, "single_positive": False, "seed": 3}
    assert len(meta["sample_ids"]) == 3
    # Same seed, same mask: runs are comparable.
    again = CocoDataModule(train=str(path), train_images=str(tmp_path / "images"), label_fraction=0.5, budget_seed=3)
    assert torch.equal(again.raw("train").masks(), mask)
    # No budget, nothing to save.
    assert save_label_mask(CocoDataModule(train=str(path)), tmp_path / "none.safetensors") is None


# ------------------------------------------------------------------------------------------- VOC
def test_voc_reader_targets_and_difficult(tmp_path):
    root = write_voc(
        tmp_path,
        {"000001": [("dog", 0), ("person", 0)], "000002": [("cat", 0), ("dog", 1)], "000003": [("pottedplant", 0)]},
        {"trainval": ["000001", "000002"], "test": ["000003"]},
    )
    ds = VocReader.read(root, "trainval")
    names = ds.classnames
    assert len(names) == 20 and "potted plant" in names and "pottedplant" not in names
    t = ds.targets()
    assert t[0, names.index("dog")] == 1 and t[0, names.index("person")] == 1 and t[0].sum() == 2
    assert t[1, names.index("cat")] == 1 and t[1].sum() == 1
    # The difficult dog is unknown, not negative.
    assert not ds[1]["mask"][names.index("dog")] and ds[1]["mask"].sum() == 19
    assert VocReader.read(root, "trainval", difficult="positive").targets()[1, names.index("dog")] == 1
    assert VocReader.read(root).targets().shape == (3, 20)
    dm = VocDataModule(str(root), label_fraction=1.0, transform=lambda im: torch.zeros(3, 4, 4))
    assert not dm.raw("train").masks()[1, names.index("dog")]  # the budget keeps annotation unknowns unknown
    assert len(dm.raw("test")) == 1 and len(dm.raw("val")) == 1



def test_voc_single_positive_overlay_builds_em_apl_on_one_positive_per_image(tmp_path, tiny_ckpt):
    # recipes/dualcoop/voc.yaml + voc_single_positive.yaml: Zhou et al.'s VOC weights, one positive per image
    from tests.conftest import REPO
    from vlweak.cli import build_cli

    root = write_voc(tmp_path, {"000001": [("dog", 0), ("person", 0)], "000002": [("cat", 0), ("dog", 0)]},
                     {"trainval": ["000001", "000002"], "test": ["000001"]})
    cli = build_cli(["--config", str(REPO / "recipes/dualcoop/voc.yaml"), "--config",
                     str(REPO / "recipes/dualcoop/voc_single_positive.yaml"), f"--data.init_args.root={root}",
                     "--model.init_args.backbone.init_args.model_name=vlweak-tiny", "--model.init_args.backbone.init_args.image_size=null",
                     f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--model.init_args.backbone.init_args.precision=fp32",
                     "--model.init_args.n_ctx=2", "--trainer.accelerator=cpu", f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    hp = cli.model.hparams
    assert (hp.loss, hp.em_alpha, hp.apl_beta, hp.apl_warmup_epochs) == ("em_apl", 0.2, 0.02, 5)
    mask, targets = cli.datamodule.raw("train").masks(), cli.datamodule.raw("train").targets()
    assert mask.sum(1).tolist() == [1, 1] and bool((targets[mask] == 1).all())  # one observed positive each

def test_voc_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Annotations"):
        VocReader.read(tmp_path / "nowhere")
    root = write_voc(tmp_path / "a", {"000001": [("unicorn", 0)]}, {"trainval": ["000001", "000009"]})
    with pytest.raises(AnnotationError, match=r"000001\.xml: object 0 has unknown class 'unicorn'"):
        VocReader.read(root)
    (root / "Annotations" / "000001.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"000001\.xml"):
        VocReader.read(root, "trainval")
    empty = write_voc(tmp_path / "b", {"000001": [("dog", 0)], "000002": []})
    with pytest.raises(AnnotationError, match=r"000002\.xml has no annotated object"):
        VocReader.read(empty)
    assert len(VocReader.read(empty, on_empty="skip")) == 1
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        VocReader.read(empty, "missing")
    with pytest.raises(ValueError, match="on_empty must be .* got 'Keep'"):
        VocReader.read(root, on_empty="Keep")
    with pytest.raises(ValueError, match="difficult must be .* got 'hard'"):
        VocDataModule(root=str(root), train="trainval", difficult="hard")


def test_an_image_listed_twice_is_read_once_or_refused_when_its_labels_disagree(tmp_path):
    images = [{"id": 1, "file_name": "img1.png"}, {"id": 2, "file_name": "img2.png"}, {"id": 9, "file_name": "img1.png"}]
    same = [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 3}, {"image_id": 9, "category_id": 1}]
    path = write_coco(tmp_path / "same", same, images)
    with pytest.warns(UserWarning, match=r"1 entries repeat an image listed before \(e.g. image id 9"):
        assert len(CocoReader.read(path)) == 2
    other = [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 3}, {"image_id": 9, "category_id": 7}]
    with pytest.raises(VocabularyError, match=r"img1.png is listed twice with different labels \(image id 1: \[0\]; image id 9: \[2\]\)"):
        CocoReader.read(write_coco(tmp_path / "other", other, images))
    root = write_voc(tmp_path / "voc", {"000001": [("dog", 0)], "000002": [("cat", 0)]},
                     {"trainval": ["000001", "000002", "000001"]})
    with pytest.warns(UserWarning, match=r"trainval.txt: 1 entries repeat an image listed before \(e.g. image id '000001'"):
        assert len(VocReader.read(root, "trainval")) == 2


def test_a_voc_filename_without_extension_is_the_ids_jpeg(tmp_path):
    root = write_voc(tmp_path, {"000001": [("dog", 0)]})
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>000001</filename><object><name>dog</name><difficult>0</difficult></object></annotation>")
    (root / "JPEGImages" / "000001.png").rename(root / "JPEGImages" / "000001.jpg")
    ds = VocReader.read(root)
    assert ds.paths == [str(root / "JPEGImages" / "000001.jpg")] and ds[0]["image"].size == (8, 8)


def test_voc_image_set_with_a_byte_order_mark(tmp_path):
    root = write_voc(tmp_path / "voc", {"000001": [("dog", 0)], "000002": [("cat", 0)]})
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\r\n000002\r\n", encoding="utf-8-sig")
    ds = VocReader.read(root, image_set="trainval")
    assert [os.path.basename(p) for p in ds.paths] == ["000001.png", "000002.png"]


def test_coco_images_without_objects_left_out_are_counted(tmp_path, caplog):
    path = write_coco(tmp_path / "c")  # image 3 has no annotation
    with caplog.at_level("INFO"):
        assert len(CocoReader.read(path, on_empty="skip")) == 3
    assert "1 of its 4 images have no annotated object" in caplog.text
