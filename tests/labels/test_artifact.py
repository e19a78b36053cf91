import pytest
import torch

from vlweak.labels import ArtifactError, PseudoLabels


def _labels(multilabel=False):
    scores = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)).softmax(1)
    return PseudoLabels.from_scores(
        scores, ["cat", "dog", "owl"], [f"img{i}.png" for i in range(5)], multilabel=multilabel,
        threshold=0.3, provenance={"method": "ZeroShot", "backbone": "vlweak-shapes"},
    )


@pytest.mark.parametrize("multilabel", [False, True])
def test_round_trip_equal(tmp_path, multilabel):
    pl = _labels(multilabel)
    path = pl.save(tmp_path / "pl.safetensors")
    back = PseudoLabels.load(path)
    for k in ("scores", "labels", "confidences", "indices"):
        assert torch.equal(getattr(pl, k), getattr(back, k)), k
    assert back.sample_ids == pl.sample_ids and back.classnames == pl.classnames
    assert back.provenance == pl.provenance and back.multilabel == multilabel
    if not multilabel:
        assert torch.equal(back.labels, pl.scores.argmax(1))
    assert back == pl and back != pl[:4]  # equal content compares equal (no ambiguous tensor truth value)
    other = PseudoLabels.load(path)
    other.scores[0, 0] += 1e-3
    assert other != pl
    # another run that labels alike: equal labels, other provenance
    rerun = PseudoLabels.load(path)
    rerun.provenance = {**rerun.provenance, "recipe": "runs/elsewhere/config.yaml"}
    assert rerun == pl and rerun.provenance != pl.provenance


def test_rows_are_taken_by_index_slice_or_mask():
    pl = _labels()
    assert pl[:2].sample_ids == ["img0.png", "img1.png"] and torch.equal(pl[:2].scores, pl.scores[:2])
    assert pl[[4, 0]].sample_ids == ["img4.png", "img0.png"] and torch.equal(pl[[4, 0]].indices, torch.tensor([4, 0]))
    sure = pl[pl.confidences > pl.confidences.median()]
    assert len(sure) == 2 and (sure.confidences > pl.confidences.median()).all()
    assert len(pl[3]) == 1 and pl[3].labels.shape == (1,) and pl[3] == pl.aligned_to(["img3.png"])


def test_vocabulary_mismatch_is_clear(tmp_path):
    path = _labels().save(tmp_path / "pl")
    assert path.suffix == ".safetensors"
    with pytest.raises(ArtifactError, match=r"missing \['bat'\], extra \['owl'\]"):
        PseudoLabels.load(path, classnames=["cat", "dog", "bat"])
    with pytest.raises(ArtifactError, match="different order"):
        PseudoLabels.load(path, classnames=["dog", "cat", "owl"])
    assert PseudoLabels.load(path, classnames=["cat", "dog", "owl"]).classnames == ["cat", "dog", "owl"]


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = _labels().save(tmp_path / "pl.safetensors")
    before = path.read_bytes()
    import vlweak.data.cache as cache

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _labels().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pl.safetensors"]  # no temp file left


def test_align_and_errors(tmp_path):
    pl = _labels()
    sub = pl.aligned_to(["img3.png", "img1.png"])
    assert torch.equal(sub.scores, pl.scores[[3, 1]])
    with pytest.raises(ArtifactError, match="no pseudolabel"):
        pl.aligned_to(["nope.png"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        PseudoLabels.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="junk.safetensors"):
        PseudoLabels.load(tmp_path / "junk.safetensors")
    with pytest.raises(ArtifactError, match="1 sample ids for 2 rows of scores"):
        PseudoLabels(["a"], ["x", "y"], torch.zeros(2, 2), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    one = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ArtifactError, match=r"scores have shape \(2,\): one row per sample and one column per class \(2 classes\)"):
        PseudoLabels(["a", "b"], ["x", "y"], torch.zeros(2), *one)
    with pytest.raises(ArtifactError, match="classnames is empty"):
        PseudoLabels(["a"], [], torch.zeros(1, 0), *one)
    with pytest.raises(ArtifactError, match=r"classnames lists 'x' twice \(columns 0 and 2\)"):
        PseudoLabels(["a"], ["x", "y", "x"], torch.zeros(1, 3), *one)
    with pytest.raises(ArtifactError, match="sample id 'a' appears twice"):
        PseudoLabels(["a", "b", "a"], ["x", "y"], torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ArtifactError, match=r"labels must be class indices in \[0, 2\); got values from 0 to 2"):
        PseudoLabels(["a", "b"], ["x", "y"], torch.zeros(2, 2), torch.tensor([0, 2]), torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("multilabel", [False, True])
def test_a_csv_export_is_a_manifest_of_the_same_labels(tmp_path, multilabel):
    import csv

    from tests.conftest import write_image_folder
    from vlweak.data.datasets import ManifestReader

    root = write_image_folder(tmp_path / "imgs", {"x": 5})
    pl = _labels(multilabel)
    labels = pl.labels.clone()
    if multilabel:
        labels[0] = 0  # an image with no class present
    pl = PseudoLabels(sorted(str(p) for p in (root / "x").iterdir()), pl.classnames, pl.scores, labels,
                      pl.confidences, pl.indices, multilabel)
    path = pl.to_csv(tmp_path / "out" / "labels.csv", scores=True)
    rows = list(csv.DictReader(open(path)))
    assert [r["path"] for r in rows] == pl.sample_ids
    assert [float(r["confidence"]) for r in rows] == pytest.approx(pl.confidences.tolist(), rel=1e-5)
    assert [float(r["score:dog"]) for r in rows] == pytest.approx(pl.scores[:, 1].tolist(), rel=1e-5)
    back = ManifestReader.read(path, classnames=pl.classnames, multilabel=multilabel)
    if multilabel:
        assert torch.equal(back.targets(), pl.labels.float())
    else:
        assert [back[i]["label"] for i in range(len(back))] == pl.labels.tolist()
