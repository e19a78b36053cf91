"""A damaged or mismatched pseudolabel artifact is an ArtifactError that names the file and the fault."""

import json

import pytest
import torch
from safetensors.torch import save_file

from vlweak.labels import ArtifactError, PseudoLabels
from vlweak.labels.artifact import FORMAT

TENSORS = {
    "scores": torch.zeros(2, 3),
    "labels": torch.zeros(2, dtype=torch.long),
    "confidences": torch.zeros(2),
    "indices": torch.zeros(2, dtype=torch.long),
}
META = {
    "format": FORMAT,
    "sample_ids": json.dumps(["x", "y"]),
    "classnames": json.dumps(["a", "b", "c"]),
    "multilabel": "false",
    "provenance": "{}",
}


def _write(tmp_path, name, meta=None, tensors=None):
    path = tmp_path / name
    save_file(TENSORS if tensors is None else tensors, str(path), metadata=META if meta is None else meta)
    return path


def test_well_formed_file_loads_and_remembers_its_path(tmp_path):
    path = _write(tmp_path, "ok.safetensors")
    art = PseudoLabels.load(path)
    assert art.path == path and len(art) == 2
    assert art.aligned_to(["y"]).path == path


@pytest.mark.parametrize(
    "name, meta, tensors, match",
    [
        ("nokeys", {"format": FORMAT, "classnames": META["classnames"]}, None,
         r"missing metadata \['sample_ids', 'multilabel', 'provenance'\]"),
        ("notensors", None, {"scores": torch.zeros(2, 3)}, r"missing tensors \['labels', 'confidences', 'indices'\]"),
        ("badjson", {**META, "classnames": "[a,b"}, None, r"metadata 'classnames' is not valid JSON"),
        ("badtype", {**META, "sample_ids": json.dumps({"x": 1})}, None, r"metadata 'sample_ids' is dict, expected a list of strings"),
        ("badbool", {**META, "multilabel": "\"no\""}, None, r"metadata 'multilabel' is str, expected true or false"),
        ("shape", {**META, "classnames": json.dumps(["a", "b"])}, None, r"scores have shape \(2, 3\): one row per sample and one column per class \(2 classes\)"),
    ],
)
def test_damaged_artifacts_name_the_path(tmp_path, name, meta, tensors, match):
    path = _write(tmp_path, f"{name}.safetensors", meta, tensors)
    with pytest.raises(ArtifactError, match=rf"{name}.safetensors is a damaged pseudolabel artifact: {match}"):
        PseudoLabels.load(path)


def test_directory_is_not_reported_as_missing(tmp_path):
    _write(tmp_path, "inside.safetensors")
    with pytest.raises(ArtifactError, match=r"is a directory, expected a pseudolabel artifact file.*inside.safetensors"):
        PseudoLabels.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        PseudoLabels.load(tmp_path / "nope.safetensors")


def test_sample_id_mismatch_names_the_artifact_and_its_own_ids(tmp_path):
    ids = [f"shapes-s0-shift0-64px/train/{i}" for i in range(4)]
    art = PseudoLabels.from_scores(torch.rand(4, 3), ["a", "b", "c"], ids, provenance={"method": "ZLaP", "stage": "test"})
    path = art.save(tmp_path / "pl.safetensors")
    wanted = [i.replace("shift0", "shift1") for i in ids]
    with pytest.raises(ArtifactError) as info:
        PseudoLabels.load(path).aligned_to(wanted)
    msg = str(info.value)
    assert "4 samples have no pseudolabel" in msg and str(path) in msg
    assert "shapes-s0-shift1-64px/train/0" in msg and "shapes-s0-shift0-64px/train/0" in msg  # theirs and ours
    assert "none of the 4 requested" in msg and "ZLaP" in msg and "another dataset or split" in msg
    # built in memory: no path to name, still the artifact's own ids
    with pytest.raises(ArtifactError, match=r"1 samples have no pseudolabel in the pseudolabels \(3 of 4 .*shift0-64px/train/0"):
        art.aligned_to(ids[:3] + ["other"])


def test_artifact_with_relative_paths_says_to_rerun(tmp_path):
    """Artifacts written before sample ids became absolute paths hold the paths as spelled."""
    rel = [f"data/pets/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(2)]
    art = PseudoLabels.from_scores(torch.rand(4, 2), ["cat", "dog"], rel)
    wanted = [f"/home/me/project/{p}" for p in rel]
    with pytest.raises(ArtifactError, match="relative.*absolute paths now: re-run the method"):
        art.aligned_to(wanted)
    with pytest.raises(ArtifactError, match="another dataset or split"):  # unrelated ids: no such hint
        art.aligned_to([f"/home/me/other/{i}.jpg" for i in range(4)])
