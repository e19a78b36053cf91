import json

import pytest
import torch

from tests.conftest import write_image_folder
from vlweak.data import ImageFolderDataModule, ImageLoadError, ManifestDataModule, VocabularyError
from vlweak.data.datasets import ImageFolderReader, ManifestReader, Transformed, collate, validate_classnames


def test_image_folder_classes_and_items(tmp_path):
    write_image_folder(tmp_path / "train", {"golden_retriever": 2, "tabby cat": 3})
    ds = ImageFolderReader.read(tmp_path / "train")
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert len(ds) == 5 and ds[0]["label"] == 0 and ds[4]["label"] == 1
    mapped = ImageFolderReader.read(tmp_path / "train", {"golden_retriever": "dog", "tabby cat": "cat"})
    assert mapped.classnames == ["dog", "cat"]


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
