import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, write_image_folder
from vlweak.data import ImageFolderDataModule, ImageLoadError, ManifestDataModule, VocabularyError
from vlweak.data.datasets import (
    ImageFolderReader,
    ManifestReader,
    Transformed,
    collate,
    load_image,
    validate_classnames,
)


def test_image_folder_classes_and_items(tmp_path):
    write_image_folder(tmp_path / "train", {"golden_retriever": 2, "tabby cat": 3})
    ds = ImageFolderReader.read(tmp_path / "train")
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert len(ds) == 5 and ds[0]["label"] == 0 and ds[4]["label"] == 1
    mapped = ImageFolderReader.read(tmp_path / "train", {"golden_retriever": "dog", "tabby cat": "cat"})
    assert mapped.classnames == ["dog", "cat"]
    # a list names the folders in sorted order; the folders' own names in another order would
    # give each folder another's name
    assert ImageFolderReader.read(tmp_path / "train", ["golden retriever", "tabby cat"]).classnames[0] == "golden retriever"
    with pytest.raises(VocabularyError, match=r"lists its class folders in another order \(\['tabby cat', 'golden retriever'\]\)"):
        ImageFolderReader.read(tmp_path / "train", ["tabby cat", "golden retriever"])
    assert ImageFolderReader.read(tmp_path / "train", ["dog", "cat"]).classnames == ["dog", "cat"]  # new names: as given


def test_accented_folder_names_match_whatever_their_unicode_form(tmp_path):
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "étoile")  # as a macOS copy stores the folder name
    write_image_folder(tmp_path / "train", {decomposed: 1, "carré": 1})
    ds = ImageFolderReader.read(tmp_path / "train", {"étoile": "star", "carré": "square"})  # keys typed composed
    assert sorted(ds.classnames) == ["square", "star"]
    named = ImageFolderReader.read(tmp_path / "train")
    assert "étoile" in named.classnames  # a class name in the composed form, as a prompt would type it


def test_images_in_a_class_folders_sub_folders_belong_to_the_class(tmp_path):
    root = write_image_folder(tmp_path / "data", {"cat": 1, "dog": 1})
    write_image_folder(root / "cat", {"indoor": 2, ".thumbs": 1})  # a hidden folder is left out
    ds = ImageFolderReader.read(root)
    rel = [os.path.relpath(p, root) for p in ds.paths]
    assert rel == ["cat/0.png", "cat/indoor/0.png", "cat/indoor/1.png", "dog/0.png"]
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 0, 1] and ds.classnames == ["cat", "dog"]
    # a link back up the tree is walked once, not until the path is too long
    (root / "cat" / "again").symlink_to(root / "cat", target_is_directory=True)
    assert [os.path.relpath(p, root) for p in ImageFolderReader.read(root).paths] == rel


def test_missing_and_corrupt_images_named(tmp_path, tiny_backbone):
    write_image_folder(tmp_path, {"a": 2})
    (tmp_path / "a" / "bad.png").write_bytes(b"not an image")
    ds = ImageFolderReader.read(tmp_path)
    bad = ds.paths.index(str(tmp_path / "a" / "bad.png"))
    with pytest.raises(ImageLoadError, match="bad.png"):
        ds[bad]
    (tmp_path / "a" / "0.png").unlink()
    with pytest.raises(ImageLoadError, match="0.png"):
        ds[ds.paths.index(str(tmp_path / "a" / "0.png"))]
    lenient = ImageFolderReader.read(tmp_path, skip_bad=True)
    lenient.paths.append(str(tmp_path / "a" / "gone.png"))
    with pytest.warns(UserWarning, match="gone.png"):
        shown = Transformed(lenient, tiny_backbone.transform)
        batch = collate([shown[i] for i in range(len(lenient))])
    assert len(batch["index"]) == len(lenient) - 2  # the corrupt file and the missing one dropped


def test_vocabulary_errors(tmp_path):
    with pytest.raises(VocabularyError, match="empty"):
        validate_classnames([])
    with pytest.raises(VocabularyError, match="duplicate.*cat"):
        validate_classnames(["cat", "dog", "cat"])
    (tmp_path / "m.csv").write_text("path,label\na.png,cat\nb.png,zebra\n")
    with pytest.raises(VocabularyError, match=r"row 3 \(b.png\).*'zebra'"):
        ManifestReader.read(tmp_path / "m.csv", classnames=["cat", "dog"])
    # -1 means "unlabeled" for a single-label row; in a multi-label row it is not a class
    (tmp_path / "ml.jsonl").write_text(json.dumps({"path": "a.png", "labels": ["-1"]}))
    with pytest.raises(VocabularyError, match="'-1'"):
        ManifestReader.read(tmp_path / "ml.jsonl", classnames=["cat", "dog", "fox"])
    (tmp_path / "np.jsonl").write_text(json.dumps({"label": "cat"}))
    with pytest.raises(ValueError, match="needs a 'path'"):
        ManifestReader.read(tmp_path / "np.jsonl", classnames=["cat"])
    with pytest.raises(FileNotFoundError, match=r"manifest not found: .*nowhere\.jsonl"):
        ManifestReader.read(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        ManifestDataModule(test=str(tmp_path / "nowhere.csv"))
    (tmp_path / "ep.csv").write_text("path,label\na.png,cat\n,dog\n")
    with pytest.raises(ValueError, match=r"ep.csv row 3: no image path"):
        ManifestReader.read(tmp_path / "ep.csv", classnames=["cat", "dog"])


def test_manifest_csv_and_jsonl_multilabel(tmp_path):
    write_image_folder(tmp_path / "imgs", {"x": 3})
    (tmp_path / "m.csv").write_text("path,label\nimgs/x/0.png,dog\nimgs/x/1.png,cat\nimgs/x/2.png,1\n")
    ds = ManifestReader.read(tmp_path / "m.csv", classnames=["cat", "dog"])
    assert [ds[i]["label"] for i in range(3)] == [1, 0, 1]
    rows = [{"path": f"imgs/x/{i}.png", "labels": labs} for i, labs in enumerate([["cat"], ["cat", "dog"], []])]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ml = ManifestReader.read(tmp_path / "m.jsonl")
    assert ml.multilabel and ml.classnames == ["cat", "dog"]
    assert ml[1]["target"].tolist() == [1.0, 1.0] and ml[2]["target"].tolist() == [0.0, 0.0]
    (tmp_path / "j.csv").write_text('path,labels\nimgs/x/0.png,"[""cat"", ""dog""]"\n')
    assert ManifestReader.read(tmp_path / "j.csv", classnames=["cat", "dog"])[0]["target"].tolist() == [1.0, 1.0]
    dm = ManifestDataModule(test=str(tmp_path / "m.jsonl"))
    assert dm.multilabel and dm.classnames == ["cat", "dog"]


def test_multilabel_rows_without_labels_are_unknown_not_negative(tmp_path, tiny_backbone):
    import lightning as L

    from vlweak.methods import ZeroShot

    write_image_folder(tmp_path / "imgs", {"x": 8})
    # "labels": [] says no class is present; a row without the key (or an empty cell) is unlabeled
    rows = [{"path": "imgs/x/0.png", "labels": ["cat"]}, {"path": "imgs/x/1.png", "labels": []},
            {"path": "imgs/x/2.png"}, {"path": "imgs/x/3.png", "labels": None}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ml = ManifestReader.read(tmp_path / "m.jsonl", classnames=["cat", "dog"], multilabel=True)
    assert [ml[i]["mask"].tolist() for i in range(4)] == [[True, True], [True, True], [False, False], [False, False]]
    assert ml.masks().tolist() == [[True, True], [True, True], [False, False], [False, False]]
    (tmp_path / "m.csv").write_text('path,labels\nimgs/x/0.png,cat|dog\nimgs/x/1.png,[]\nimgs/x/2.png,\n')
    csv_rows = ManifestReader.read(tmp_path / "m.csv", classnames=["cat", "dog"], multilabel=True)
    assert csv_rows.masks()[:, 0].tolist() == [True, True, False]

    # scored: the unlabeled rows count neither as positives nor as negatives
    labeled = [{"path": f"imgs/x/{i}.png", "labels": [["cat"], ["dog"], [], ["cat", "dog"]][i % 4]} for i in range(0, 8, 2)]
    half = [labeled[i // 2] if i % 2 == 0 else {"path": f"imgs/x/{i}.png"} for i in range(8)]
    (tmp_path / "labeled.jsonl").write_text("\n".join(json.dumps(r) for r in labeled))
    (tmp_path / "half.jsonl").write_text("\n".join(json.dumps(r) for r in half))
    maps = {}
    for name in ("labeled", "half"):
        dm = ManifestDataModule(test=str(tmp_path / f"{name}.jsonl"), classnames=["cat", "dog"], multilabel=True,
                                transform=tiny_backbone.transform, batch_size=4)
        model = ZeroShot(backbone=tiny_backbone, artifact_path="")
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(model, datamodule=dm, verbose=False)
        maps[name] = model.last_metrics["test/mAP"]
    assert maps["half"] == pytest.approx(maps["labeled"])
    # a manifest without labels is pseudolabelled with no metrics, not scored as all-negative
    (tmp_path / "none.jsonl").write_text("\n".join(json.dumps({"path": f"imgs/x/{i}.png"}) for i in range(8)))
    dm = ManifestDataModule(test=str(tmp_path / "none.jsonl"), classnames=["cat", "dog"], multilabel=True,
                            transform=tiny_backbone.transform, batch_size=4)
    model = ZeroShot(backbone=tiny_backbone, artifact_path="")
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(model, datamodule=dm, verbose=False)
    assert "test/mAP" not in model.last_metrics


def test_manifest_header_spelling_and_a_missing_label_column(tmp_path):
    write_image_folder(tmp_path / "imgs", {"x": 2})
    # a spreadsheet's byte-order mark and a space after the comma are not part of the column names
    (tmp_path / "bom.csv").write_bytes("\ufeffpath, label\nimgs/x/0.png, cat\nimgs/x/1.png,dog\n".encode("utf-8"))
    ds = ManifestReader.read(tmp_path / "bom.csv")
    assert ds.classnames == ["cat", "dog"] and [ds[i]["label"] for i in range(2)] == [0, 1]
    # a label column under another name: named, not "the class list is empty"
    (tmp_path / "cls.csv").write_text("path,class\nimgs/x/0.png,cat\n")
    with pytest.raises(ValueError, match=r"cls.csv has no 'label' \(one class\) or 'labels' \(several\) column; found \['class', 'path'\]"):
        ManifestReader.read(tmp_path / "cls.csv")
    with pytest.warns(UserWarning, match="its 1 images are read as unlabeled"):
        assert ManifestReader.read(tmp_path / "cls.csv", classnames=["cat", "dog"])[0]["label"] == -1
    # no label column and no other: a pool of unlabeled images, as meant
    (tmp_path / "pool.csv").write_text("path\nimgs/x/0.png\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ManifestReader.read(tmp_path / "pool.csv", classnames=["cat", "dog"])[0]["label"] == -1
    # a JSON row whose label key is misspelled
    rows = [{"path": "imgs/x/0.png", "label": "cat"}, {"path": "imgs/x/1.png", "lable": "dog"}]
    (tmp_path / "typo.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match=r"1 rows \(e.g. row 2\) have no 'label' but other keys \(\['lable'\]\)"):
        ManifestReader.read(tmp_path / "typo.jsonl", classnames=["cat", "dog"])


def test_image_folder_datamodule_splits_and_transform(tmp_path, tiny_backbone):
    write_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "test", {"a": 1, "b": 1})
    dm = ImageFolderDataModule(str(tmp_path), val=None, transform=tiny_backbone.transform, batch_size=2)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].tolist() == [0, 1]
    flat = ImageFolderDataModule(str(tmp_path / "train"))
    assert set(flat.split_dirs) == {"test"}


def test_transformed_keeps_other_keys(tiny_backbone):
    ds = Transformed([{"image": torch.zeros(3, 20, 24, dtype=torch.uint8), "label": 1, "index": 0}], tiny_backbone.transform)
    assert ds[0]["image"].shape == (3, 32, 32) and ds[0]["label"] == 1


def test_integer_labels_need_classnames(tmp_path):
    rows = "\n".join(f"{i}.png,{lab}" for i, lab in enumerate([0, 1, 2, 10, 2, -1]))
    (tmp_path / "idx.csv").write_text(f"path,label\n{rows}\n")
    (tmp_path / "0.png").touch()  # the listed paths resolve (only the labels are read here)
    # sorted as text they would be classes ['-1', '0', '1', '10', '2'], silently wrong
    expected = f"labels of manifest {tmp_path / 'idx.csv'} look like class indices (e.g. ['-1', '0', '1', '2', '10'])"
    with pytest.raises(VocabularyError, match=re.escape(expected + ": give `classnames`")):
        ManifestReader.read(tmp_path / "idx.csv")
    with pytest.raises(VocabularyError, match="look like class indices"):
        ManifestDataModule(test=str(tmp_path / "idx.csv"))
    (tmp_path / "idx.jsonl").write_text("\n".join(json.dumps({"path": f"{i}.png", "labels": [i, 3]}) for i in range(3)))
    with pytest.raises(VocabularyError, match=r"idx\.jsonl look like class indices"):
        ManifestReader.read(tmp_path / "idx.jsonl")
    names = [f"c{k}" for k in range(11)]
    ds = ManifestReader.read(tmp_path / "idx.csv", classnames=names)
    assert ds.labels == [0, 1, 2, 10, 2, -1] and ds.classnames == names
    (tmp_path / "mixed.csv").write_text("path,label\na.png,cat\nb.png,dog\n")
    (tmp_path / "a.png").touch()
    assert ManifestReader.read(tmp_path / "mixed.csv").classnames == ["cat", "dog"]


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_grayscale_is_scaled_not_clipped(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 65535, 64), (8, 1))  # a horizontal gradient over the 16-bit range
    if mode == "I;16":
        image, path = Image.fromarray(ramp.astype(np.uint16)), tmp_path / "g.png"
    elif mode == "I":
        image, path = Image.fromarray(ramp.astype(np.int32)), tmp_path / "g.tif"
    else:
        image, path = Image.fromarray((ramp / 65535).astype(np.float32)), tmp_path / "g.tif"
    image.save(path)
    assert Image.open(path).mode == mode
    got = np.asarray(load_image(path))
    assert got.shape == (8, 64, 3) and got.dtype == np.uint8
    row = got[0, :, 0].astype(int)
    assert len(np.unique(row)) > 32  # not constant (clipping made it all 255)
    assert (np.diff(row) >= 0).all() and row[0] == 0 and row[-1] == 255  # the ordering is kept
    assert (got == got[:1, :, :1]).all()  # grey: the same in every row and channel
    # an I image whose values lie in 0..255 is already 8-bit; a float one in 0..255 too
    small = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.int32), (2, 1)))
    small.save(tmp_path / "small.tif")
    assert np.asarray(load_image(tmp_path / "small.tif"))[0, :, 0].tolist() == list(range(0, 256, 4))
    Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.float32), (2, 1))).save(tmp_path / "f255.tif")
    assert np.asarray(load_image(tmp_path / "f255.tif"))[0, :, 0].tolist() == list(range(0, 256, 4))


def test_manifest_formats_by_suffix_in_any_case(tmp_path):
    write_image_folder(tmp_path / "imgs", {"x": 2})
    rows = [{"path": "imgs/x/0.png", "label": "cat"}, {"path": "imgs/x/1.png", "label": "dog"}]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "UPPER.JSONL").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "UPPER.CSV").write_text("path,label\nimgs/x/0.png,cat\nimgs/x/1.png,dog\n")
    for name in ("array.json", "lines.json", "UPPER.JSONL", "UPPER.CSV"):
        ds = ManifestReader.read(tmp_path / name)
        assert ds.classnames == ["cat", "dog"] and ds.labels == [0, 1], name
        assert ds[1]["label"] == 1
    assert ManifestDataModule(test=str(tmp_path / "array.json")).classnames == ["cat", "dog"]
    # row numbers: CSV counts the header line, JSON Lines the lines
    (tmp_path / "E.CSV").write_text("path,label\na.png,cat\nb.png,zebra\n")
    with pytest.raises(VocabularyError, match=r"E\.CSV row 3 \(b\.png\)"):
        ManifestReader.read(tmp_path / "E.CSV", classnames=["cat"])
    (tmp_path / "E.JSONL").write_text("\n".join(json.dumps({"path": p, "label": "zebra"}) for p in ("a.png", "b.png")))
    with pytest.raises(VocabularyError, match=r"E\.JSONL row 1 \(a\.png\)"):
        ManifestReader.read(tmp_path / "E.JSONL", classnames=["cat"])
    (tmp_path / "m.txt").write_text("path,label\na.png,cat\n")
    with pytest.raises(ValueError, match=re.escape(f"manifest {tmp_path / 'm.txt'}: unknown format '.txt' "
                                                   "(supported: .csv, .jsonl, .json")):
        ManifestReader.read(tmp_path / "m.txt")
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"nums\.json: row 1 is a JSON int, expected an object"):
        ManifestReader.read(tmp_path / "nums.json")
    (tmp_path / "bad.json").write_text('{"path": "a.png"}\n{"path": \n')
    with pytest.raises(ValueError, match=r"bad\.json:2: invalid JSON"):
        ManifestReader.read(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="has no rows"):
        ManifestReader.read(tmp_path / "empty.json")


def test_hidden_files_in_class_folders_are_not_images(tmp_path):
    root = write_image_folder(tmp_path / "data", {"cat": 2, "dog": 1})
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "dog" / ".hidden.jpg").write_bytes(b"")
    ds = ImageFolderReader.read(root)
    assert len(ds) == 3 and not any(os.path.basename(p).startswith(".") for p in ds.paths)
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 0, 1]  # every item loads without skip_bad
    # split folders under other names holding only hidden "images" are still split folders
    nested = write_image_folder(tmp_path / "nested" / "training", {"cat": 1}).parent
    (nested / "training" / "._cover.png").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match=r"split folders .* not found \(found: training\)"):
        ImageFolderDataModule(str(nested))


def test_sample_ids_are_absolute_whatever_the_spelling(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "if_split", {"cat": 2, "dog": 1})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "m.csv").write_text("path,label\nif_split/cat/0.png,cat\nif_split/dog/0.png,dog\n")
    monkeypatch.chdir(tmp_path)
    rel = ImageFolderReader.read("if_split").sample_ids
    assert rel == ImageFolderReader.read(root).sample_ids == ImageFolderReader.read("elsewhere/../if_split/").sample_ids
    assert rel[0] == os.path.abspath(root / "cat" / "0.png") and all(os.path.isabs(s) for s in rel)
    manifest_ids = ManifestReader.read("m.csv").sample_ids
    assert manifest_ids == [rel[0], rel[2]]
    assert ManifestReader.read("m.csv", root=".").sample_ids == manifest_ids
    dm_ids = ImageFolderDataModule("if_split").sample_ids("test")
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working directory, another spelling
    assert ImageFolderReader.read("../if_split").sample_ids == rel
    assert ImageFolderDataModule("../if_split").sample_ids("test") == dm_ids == rel
    assert ManifestReader.read("../m.csv").sample_ids == manifest_ids
    # a symlinked root keeps its own spelling (links are not resolved)
    os.symlink(root, tmp_path / "link")
    linked = ImageFolderReader.read(tmp_path / "link").sample_ids
    assert linked[0] == str(tmp_path / "link" / "cat" / "0.png")


def test_caption_manifest_serves_pairs_without_classes_and_names_bad_rows(tmp_path):
    from tests.conftest import write_caption_manifest

    manifest = write_caption_manifest(tmp_path, 4)
    dm = ManifestDataModule(train=str(manifest), captions="caption", batch_size=4)
    assert dm.classnames == [] and not dm.multilabel
    item = dm.build_split("train")[1]
    assert item["caption"] == manifest.read_text().splitlines()[2].split(",", 1)[1].strip('"') and item["index"] == 1
    with pytest.raises(ValueError, match=r"no caption column 'text'; found \['caption', 'path'\]"):
        ManifestDataModule(train=str(manifest), captions="text")
    rows = manifest.read_text().splitlines()
    rows[3] = "002.png,"
    manifest.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"row 4 \(002.png\): no caption in column 'caption'"):
        ManifestDataModule(train=str(manifest), captions="caption")
    # without captions the same file is a labelling manifest, which needs a label column or classes
    with pytest.raises(ValueError, match=r"has no 'label' .* column; found \['caption', 'path'\]"):
        ManifestDataModule(train=str(manifest))


def test_classnames_from_a_file(tmp_path):
    from vlweak.data.datasets import load_classnames
    from vlweak.data.multilabel import VocDataModule

    (tmp_path / "classes.txt").write_text("# CIFAR-style, one per line\ntabby cat\n\n  golden retriever \n")
    (tmp_path / "wnids.yaml").write_text("n01: tabby cat\nn02: golden retriever\n")
    (tmp_path / "list.json").write_text('["tabby cat", "golden retriever"]')
    assert load_classnames(str(tmp_path / "classes.txt")) == ["tabby cat", "golden retriever"]
    assert load_classnames(tmp_path / "list.json") == ["tabby cat", "golden retriever"]
    assert load_classnames(["a"]) == ["a"] and load_classnames(None) is None
    # an image folder of WordNet-id folders named through a map file
    write_image_folder(tmp_path / "imgs", {"n01": 1, "n02": 2})
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), classnames=str(tmp_path / "wnids.yaml"))
    assert dm.classnames == ["tabby cat", "golden retriever"]
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), classnames=str(tmp_path / "classes.txt"))
    assert dm.classnames == ["tabby cat", "golden retriever"]
    (tmp_path / "m.csv").write_text("path,label\nimgs/n01/0.png,0\nimgs/n02/0.png,1\n")
    assert ManifestDataModule(test=str(tmp_path / "m.csv"), classnames=str(tmp_path / "list.json")).classnames == ["tabby cat", "golden retriever"]
    with pytest.raises(ValueError, match="not a map"):
        ManifestDataModule(test=str(tmp_path / "m.csv"), classnames=str(tmp_path / "wnids.yaml"))
    with pytest.raises(FileNotFoundError, match=r"class-name file not found: .*missing\.txt"):
        ImageFolderDataModule(root=str(tmp_path / "imgs"), classnames=str(tmp_path / "missing.txt"))
    (tmp_path / "names.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"names\.csv: unknown format '\.csv'"):
        load_classnames(str(tmp_path / "names.csv"))
    (tmp_path / "scalar.yaml").write_text("cat\n")
    with pytest.raises(ValueError, match=r"scalar\.yaml holds a str: expected a list of names"):
        load_classnames(str(tmp_path / "scalar.yaml"))
    with pytest.raises(FileNotFoundError, match="class-name file not found"):  # the VOC module reads the same files
        VocDataModule(root=str(tmp_path), classnames=str(tmp_path / "missing.txt"))


def test_manifest_rows_repeating_an_image_are_read_once_or_refused_when_they_disagree(tmp_path):
    write_image_folder(tmp_path / "imgs", {"x": 3})
    (tmp_path / "m.csv").write_text("path,label\nimgs/x/0.png,dog\nimgs/x/1.png,cat\n./imgs/x/0.png,dog\n")
    with pytest.warns(UserWarning, match=r"1 entries repeat an image listed before \(e.g. row 4, .*imgs/x/0.png\)"):
        ds = ManifestReader.read(tmp_path / "m.csv", classnames=["cat", "dog"])
    assert len(ds) == 2 and len(set(ds.sample_ids)) == 2
    (tmp_path / "c.csv").write_text("path,label\nimgs/x/0.png,dog\nimgs/x/1.png,cat\nimgs/x/0.png,cat\n")
    with pytest.raises(VocabularyError, match=r"0.png is listed twice with different labels \(row 2: 1; row 4: 0\)"):
        ManifestReader.read(tmp_path / "c.csv", classnames=["cat", "dog"])
    # image-caption pairs may give an image several captions
    (tmp_path / "cap.csv").write_text("path,caption\nimgs/x/0.png,a dog\nimgs/x/0.png,a brown dog\n")
    assert len(ManifestReader.read(tmp_path / "cap.csv", caption_key="caption")) == 2


def test_comma_separated_multilabel_cells_are_split_unless_a_class_holds_the_comma(tmp_path):
    write_image_folder(tmp_path / "imgs", {"x": 2})
    rows = [{"path": "imgs/x/0.png", "labels": "circle,square"}, {"path": "imgs/x/1.png", "labels": "square, triangle"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ml = ManifestReader.read(tmp_path / "m.jsonl")
    assert ml.classnames == ["circle", "square", "triangle"]
    assert ml[0]["target"].tolist() == [1.0, 1.0, 0.0] and ml[1]["target"].tolist() == [0.0, 1.0, 1.0]
    named = ManifestReader.read(tmp_path / "m.jsonl", classnames=["circle,square", "square", "triangle"])
    assert named[0]["target"].tolist() == [1.0, 0.0, 0.0]


def test_a_class_named_like_a_split_in_a_folder_without_split_folders_is_a_class(tmp_path):
    # CIFAR-100, VOC and COCO have a class "train": beside the other class folders it is one
    root = write_image_folder(tmp_path / "vehicles", {"boat": 2, "bus": 2, "train": 3})
    dm = ImageFolderDataModule(root=str(root))
    assert dm.classnames == ["boat", "bus", "train"] and dm.split_dirs == {"test": root}
    assert len(dm.raw("test")) == 7
    # a split layout with an unlabeled train folder stays one
    write_image_folder(tmp_path / "split" / "test", {"boat": 2, "bus": 2})
    write_image_folder(tmp_path / "pool", {"x": 3})
    (tmp_path / "pool" / "x").rename(tmp_path / "split" / "train")
    dm = ImageFolderDataModule(root=str(tmp_path / "split"), classnames=["boat", "bus"])
    assert set(dm.split_dirs) == {"train", "test"} and dm.classnames == ["boat", "bus"]


def test_an_image_over_pils_size_limit_is_named_and_skippable(tmp_path, monkeypatch):
    write_image_folder(tmp_path, {"a": 2}, size=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16 x 16 = 256 pixels: over twice the limit
    ds = ImageFolderReader.read(tmp_path)
    with pytest.raises(ImageLoadError, match=r"0.png is larger than PIL opens by default .* PIL.Image.MAX_IMAGE_PIXELS"):
        ds[0]
    with pytest.warns(UserWarning, match="skipping unreadable image .*0.png"):
        assert ImageFolderReader.read(tmp_path, skip_bad=True)[0] is None


def test_classname_files_with_a_byte_order_mark_and_maps_with_numeric_folders(tmp_path):
    from vlweak.data.datasets import load_classnames

    (tmp_path / "c.txt").write_text("\ufeffpolygon\ncircle\n", encoding="utf-8")
    assert load_classnames(str(tmp_path / "c.txt")) == ["polygon", "circle"]
    (tmp_path / "m.yaml").write_text("0: salamander\n1: turtle\n")
    assert load_classnames(str(tmp_path / "m.yaml")) == {"0": "salamander", "1": "turtle"}
    root = write_image_folder(tmp_path / "data", {"0": 1, "1": 1})
    dm = ImageFolderDataModule(root=str(root), classnames={0: "salamander", 1: "turtle"})
    assert dm.classnames == ["salamander", "turtle"]


def test_class_names_that_make_the_same_prompt_are_refused_and_case_twins_warned(tmp_path):
    with pytest.raises(VocabularyError, match=r"same prompt \('sea_lion' and 'sea lion'.*never be predicted"):
        validate_classnames(["sea_lion", "sea lion", "seal"])
    with pytest.warns(UserWarning, match=r"differ only in case \('Cat' and 'cat'\)"):
        validate_classnames(["Cat", "cat", "dog"])


def test_wordnet_id_folders_without_a_map_are_warned_of(tmp_path):
    root = write_image_folder(tmp_path / "inet", {"n01440764": 1, "n01443537": 1})
    with pytest.warns(UserWarning, match=r"WordNet ids \(\['n01440764', 'n01443537'\] \.\.\.\).*give classnames"):
        ImageFolderReader.read(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageFolderReader.read(root, {"n01440764": "tench", "n01443537": "goldfish"}).classnames == ["tench", "goldfish"]


# ---------------------------------------------------------------- real data as it comes
def test_a_classnames_list_is_checked_against_folders_differing_in_case(tmp_path):
    # folders sort as Square, circle, triangle: the list in another order would swap two classes' names
    write_image_folder(tmp_path / "d", {"Square": 1, "circle": 1, "triangle": 1})
    with pytest.raises(VocabularyError, match="lists its class folders in another order"):
        ImageFolderReader.read(tmp_path / "d", ["circle", "square", "triangle"])
    assert ImageFolderReader.read(tmp_path / "d", ["square", "circle", "triangle"]).classnames == ["square", "circle", "triangle"]


def test_numbered_class_folders_take_a_map_not_a_list(tmp_path, caplog):
    write_image_folder(tmp_path / "d", {str(k): 1 for k in range(1, 13)})  # Flowers-102 style: 1 ... 12
    names = [f"flower {k}" for k in range(1, 13)]
    with pytest.raises(VocabularyError, match=r"are numbers, .* sorted text order \(1, 10, 11, 12, \.\.\.\).*\{folder: name\} map"):
        ImageFolderReader.read(tmp_path / "d", names)
    ds = ImageFolderReader.read(tmp_path / "d", {str(k): f"flower {k}" for k in range(1, 13)})
    assert [ds.classnames[lab] for lab in ds.labels] == [f"flower {f}" for f in sorted(map(str, range(1, 13)))]
    with pytest.warns(UserWarning, match="are numbers .* 'a photo of a 1.'"):
        ImageFolderReader.read(tmp_path / "d")
    write_image_folder(tmp_path / "few", {str(k): 1 for k in range(1, 4)})  # 1, 2, 3 sort the same either way
    assert ImageFolderReader.read(tmp_path / "few", ["a", "b", "c"]).classnames == ["a", "b", "c"]


def test_system_folders_formats_and_loose_images(tmp_path):
    root = write_image_folder(tmp_path / "d", {"cat": 2, "dog": 1})
    write_image_folder(root / "__MACOSX", {"cat": 1})  # a macOS zip's shadow tree
    write_image_folder(root / "cat" / "@eaDir", {"0.png": 1})  # a Synology NAS's thumbnails
    Image.new("RGB", (8, 8)).save(root / "dog" / "extra.ppm")
    Image.new("RGB", (8, 8)).save(root / "dog" / "photo.jfif", format="JPEG")
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    with pytest.warns(UserWarning, match=r"1 image directly in .* \(e.g. loose.png\) is in no class folder"):
        ds = ImageFolderReader.read(root)
    assert ds.classnames == ["cat", "dog"]
    assert sorted(os.path.relpath(p, root) for p in ds.paths) == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/extra.ppm", "dog/photo.jfif"]


def test_class_folders_in_either_unicode_form_keep_one_order_across_splits(tmp_path):
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "círculo"), "círculo"
    write_image_folder(tmp_path / "train", {nfd: 1, "cuadrado": 1})  # copied from macOS: as bytes before "cuadrado"
    write_image_folder(tmp_path / "test", {nfc: 1, "cuadrado": 1})  # composed: as bytes after it
    for split, folder in (("train", nfd), ("test", nfc)):
        ds = ImageFolderReader.read(tmp_path / split)
        assert ds.classnames == ["cuadrado", "círculo"]  # sorted in the composed form, whatever the disk's
        assert [ds.labels[i] for i, p in enumerate(ds.paths) if os.path.basename(os.path.dirname(p)) == folder] == [1]
    dm = ImageFolderDataModule(root=str(tmp_path), transform=lambda image: image)
    dm.setup("fit")
    dm.setup("test")
    assert dm.classnames == ["cuadrado", "círculo"]


def test_manifest_encodings_label_sets_and_paths(tmp_path):
    write_image_folder(tmp_path / "img", {"cat": 2})
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,label\nimg/cat/0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8 text: byte b'\\xe9' at line 2 .* save it as UTF-8"):
        ManifestReader.read(latin)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("path,label\nimg/cat/0.png,café\n", encoding="utf-16")  # with its byte-order mark
    assert ManifestReader.read(utf16).classnames == ["café"]
    # a label set repeated in another order is the same labels; paths come with stray spaces
    sets = tmp_path / "sets.csv"
    sets.write_text("path,labels\n img/cat/0.png ,cat|dog\nimg/cat/0.png,dog|cat\nimg/cat/1.png,dog|dog\n")
    ds = ManifestReader.read(sets)
    assert ds.labels == [[0, 1], [1]] and ds.paths[0] == str(tmp_path / "img/cat/0.png")
    url = tmp_path / "url.csv"
    url.write_text("path,label\nhttps://example.com/a.jpg,cat\n")
    with pytest.raises(ValueError, match=r"url.csv row 2: https://example.com/a.jpg is a URL"):
        ManifestReader.read(url)
    # paths relative to the working folder, not to the manifest's: named before any image is read
    (tmp_path / "lists").mkdir()
    cwd_rel = tmp_path / "lists" / "cwd.csv"
    cwd_rel.write_text("path,label\nimg/cat/0.png,cat\nimg/cat/1.png,cat\n")
    os.chdir(tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match=r"none of its first 2 relative image paths \(e.g. img/cat/0.png\) is in "
                           r".*lists, the folder they resolve against .* relative to the working folder"):
            ManifestReader.read(cwd_rel)
        assert len(ManifestReader.read(cwd_rel, root=".")) == 2
    finally:
        os.chdir(REPO)
    semi = tmp_path / "semi.csv"  # a spreadsheet of a ';'-separated locale, its columns capitalised
    semi.write_text("Path;Label\nimg/cat/0.png;cat\nimg/cat/1.png;dog\n")
    assert ManifestReader.read(semi).labels == [0, 1]
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\nimg/cat/0.png,\nimg/cat/1.png,\n")
    with pytest.raises(VocabularyError, match="no row has a label in its 'label' column"):
        ManifestReader.read(empty)
    assert ManifestReader.read(empty, classnames=["cat", "dog"]).labels == [-1, -1]
    nan = tmp_path / "nan.csv"
    nan.write_text("path,label\nimg/cat/0.png,cat\nimg/cat/1.png,nan\n")
    with pytest.warns(UserWarning, match="label 'nan' reads like a missing value"):
        ManifestReader.read(nan)


def test_a_list_matching_no_folder_name_shows_the_pairing(tmp_path, caplog):
    # photos sorted into year folders, named with a vocabulary: the folders become those classes, in order
    write_image_folder(tmp_path / "photos", {"2023": 1, "2024": 1, "2025": 1})
    with caplog.at_level("INFO"):
        ImageFolderReader.read(tmp_path / "photos", ["circle", "square", "triangle"])
    assert "take the classnames in sorted folder order: 2023 -> circle, 2024 -> square, 2025 -> triangle" in caplog.text
