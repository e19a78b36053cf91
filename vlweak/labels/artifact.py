"""The pseudolabel artifact: one on-disk format every method writes and every method reads.

A single safetensors file holds the tensors (``scores [N, C]``, ``labels`` — ``[N]`` class indices
or ``[N, C]`` multi-hot —, ``confidences [N]``, ``indices [N]``) and, in its metadata, JSON with the
sample ids, the class vocabulary and the provenance (method, backbone, recipe, ...). Writes are
atomic: a crash mid-write leaves the previous file intact.

Chaining is the point: zero-shot → CHiLS → ZLaP → prompt tuning read each other's artifacts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from vlweak.data.cache import atomic_save_tensors
from vlweak.data.datasets import vocabulary_difference

FORMAT = "vlweak-pseudolabels/1"


class ArtifactError(ValueError):
    """A pseudolabel artifact is malformed or does not match what the reader expects."""


#: JSON metadata entries of an artifact and the type each must decode to.
_META_TYPES: dict[str, type] = {"sample_ids": list, "classnames": list, "multilabel": bool, "provenance": dict}
_TENSORS = ("scores", "labels", "confidences", "indices")


def _parse_meta(path: Path, key: str, text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is a damaged pseudolabel artifact: metadata {key!r} is not valid JSON ({err})") from err
    want = _META_TYPES[key]
    if not isinstance(value, want) or (want is list and not all(isinstance(v, str) for v in value)):
        got = type(value).__name__
        expected = {list: "a list of strings", bool: "true or false", dict: "a JSON object"}[want]
        raise ArtifactError(f"{path} is a damaged pseudolabel artifact: metadata {key!r} is {got}, expected {expected}")
    return value


@dataclass(repr=False, eq=False)
class PseudoLabels:
    """Pseudolabels for ``N`` samples over a ``C``-class vocabulary.

    Attributes:
        sample_ids: one id per sample (the absolute image path of file-backed data, or a dataset-specific id).
        classnames: the class vocabulary, in score-column order.
        scores: ``[N, C]`` class scores (probabilities for single-label methods).
        labels: ``[N]`` hard labels, or ``[N, C]`` multi-hot labels when ``multilabel``.
        confidences: ``[N]`` confidence of each hard label.
        indices: ``[N]`` dataset indices of the samples.
        multilabel: whether labels are multi-hot.
        provenance: method, backbone, recipe and anything else that says how they were made.
        path: the file :meth:`load` read them from (``None`` when built in memory); error messages name it.
    """

    sample_ids: list[str]
    classnames: list[str]
    scores: Tensor
    labels: Tensor
    confidences: Tensor
    indices: Tensor
    multilabel: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the file it was loaded from (``None`` when built in memory); named in error messages.
    path: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        n, c = len(self.sample_ids), len(self.classnames)
        if not c:
            raise ArtifactError("pseudolabels need a class vocabulary: classnames is empty")
        named = {}
        for i, name in enumerate(self.classnames):
            if name in named:
                raise ArtifactError(f"classnames lists {name!r} twice (columns {named[name]} and {i}): a column per class")
            named[name] = i
        if self.scores.dim() != 2 or self.scores.shape[1] != c:
            raise ArtifactError(f"scores have shape {tuple(self.scores.shape)}: one row per sample and one column "
                                f"per class ({c} classes) are needed")
        if self.scores.shape[0] != n:
            raise ArtifactError(f"{n} sample ids for {self.scores.shape[0]} rows of scores: one id per row")
        if len(set(self.sample_ids)) != n:
            seen: set[str] = set()
            twice = next(s for s in self.sample_ids if s in seen or seen.add(s))
            raise ArtifactError(f"sample id {twice!r} appears twice: one row per sample")
        want = (n, c) if self.multilabel else (n,)
        if tuple(self.labels.shape) != want:
            raise ArtifactError(f"labels have shape {tuple(self.labels.shape)}, expected {want}")
        if not self.multilabel and n and not bool(((self.labels >= 0) & (self.labels < c)).all()):
            raise ArtifactError(f"labels must be class indices in [0, {c}); got values from {int(self.labels.min())} "
                                f"to {int(self.labels.max())}")
        if tuple(self.confidences.shape) != (n,) or tuple(self.indices.shape) != (n,):
            raise ArtifactError("confidences and indices need one entry per sample")

    @classmethod
    def from_scores(
        cls,
        scores: Tensor,
        classnames: list[str],
        sample_ids: list[str],
        indices: Tensor | None = None,
        multilabel: bool = False,
        threshold: float = 0.5,
        provenance: dict[str, Any] | None = None,
    ) -> "PseudoLabels":
        """Hard labels from scores: argmax (single-label) or ``scores >= threshold`` (multi-label)."""
        scores = scores.detach().float().cpu()
        if multilabel:
            labels = (scores >= threshold).to(torch.uint8)
            confidences = scores.max(1).values
        else:
            confidences, labels = scores.max(1)
        if indices is None:
            indices = torch.arange(len(scores))
        return cls([str(s) for s in sample_ids], list(classnames), scores, labels, confidences, indices.long().cpu(), multilabel, provenance or {})

    def __repr__(self) -> str:  # a summary: the full sample id list of a real dataset floods a notebook
        made = ", ".join(f"{k}={self.provenance[k]!r}" for k in ("method", "stage", "split") if self.provenance.get(k))
        names = ", ".join(self.classnames[:5]) + (", ..." if len(self.classnames) > 5 else "")
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        kind = "multi-label" if self.multilabel else "single-label"
        return f"PseudoLabels(N={len(self)}, C={len(self.classnames)} [{names}], {kind}{', ' + made if made else ''}{where})"

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __eq__(self, other: object) -> bool:
        """The same labels: ids, vocabulary, every tensor and the kind of labels. Not the provenance
        (two runs that label alike compare equal; compare ``.provenance`` for where they came from)
        nor the file it was read from."""
        if not isinstance(other, PseudoLabels):
            return NotImplemented
        return (
            self.sample_ids == other.sample_ids and self.classnames == other.classnames
            and self.multilabel == other.multilabel
            and all(torch.equal(getattr(self, f), getattr(other, f)) for f in ("scores", "labels", "confidences", "indices"))
        )

    __hash__ = None  # mutable tensors: no hash

    def __getitem__(self, rows: int | slice | Sequence[int] | Tensor) -> "PseudoLabels":
        """The samples at ``rows`` (an index, a slice, indices or a boolean mask), as pseudolabels of
        their own: ``pl[:10]``, ``pl[pl.confidences > 0.9]``."""
        order = torch.arange(len(self))[rows]
        order = order.reshape(-1)
        return self._rows(order, [self.sample_ids[i] for i in order.tolist()])

    def _rows(self, order: Tensor, sample_ids: list[str]) -> "PseudoLabels":
        return PseudoLabels(
            list(sample_ids),
            self.classnames,
            self.scores[order],
            self.labels[order],
            self.confidences[order],
            self.indices[order],
            self.multilabel,
            dict(self.provenance),
            self.path,
        )

    # ---------------------------------------------------------------- disk
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path`` (``.safetensors`` is appended if missing)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        meta = {
            "format": FORMAT,
            "sample_ids": json.dumps(self.sample_ids),
            "classnames": json.dumps(self.classnames),
            "multilabel": json.dumps(self.multilabel),
            "provenance": json.dumps(self.provenance, default=str),
        }
        tensors = {
            "scores": self.scores.float(),
            "labels": self.labels,
            "confidences": self.confidences.float(),
            "indices": self.indices.long(),
        }
        atomic_save_tensors(tensors, path, meta)
        return path

    def to_csv(self, path: str | os.PathLike, scores: bool = False) -> Path:
        """A table for other tools: one row per sample with its id (``path``: the image path of
        file-backed data), its label by name (multi-label ``labels``: the positive classes,
        ``|``-separated) and its confidence; ``scores`` adds a column per class. It is a manifest:
        ``ManifestDataModule`` reads its images with these labels. Written atomically."""
        import csv

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = ["path", "labels" if self.multilabel else "label", "confidence"]
        head += [f"score:{c}" for c in self.classnames] if scores else []
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(head)
            for i, sample in enumerate(self.sample_ids):
                if self.multilabel:
                    # none present is "[]": an empty cell would read as unlabeled
                    label = "|".join(c for c, on in zip(self.classnames, self.labels[i].tolist()) if on) or "[]"
                else:
                    label = self.classnames[int(self.labels[i])]
                row = [sample, label, f"{float(self.confidences[i]):.6g}"]
                row += [f"{v:.6g}" for v in self.scores[i].tolist()] if scores else []
                out.writerow(row)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, classnames: list[str] | None = None) -> "PseudoLabels":
        """Read an artifact; with ``classnames``, a different vocabulary is an :class:`ArtifactError`.

        Raises:
            FileNotFoundError: nothing exists at ``path``.
            ArtifactError: ``path`` is a directory, not a readable safetensors file, not a vlweak
                artifact, or one with missing / malformed metadata or tensors (the message names
                ``path`` and what is wrong), or made for a different vocabulary.
        """
        path = Path(path)
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f"; it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}" if found else ""
            raise ArtifactError(f"{path} is a directory, expected a pseudolabel artifact file (.safetensors){hint}")
        if not path.is_file():
            raise FileNotFoundError(f"pseudolabel artifact not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise ArtifactError(f"{path} is not a readable safetensors file: {err}") from err
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a vlweak pseudolabel artifact (format {meta.get('format')!r})")
        missing_meta = [k for k in _META_TYPES if k not in meta]
        missing_tensors = [k for k in _TENSORS if k not in tensors]
        if missing_meta or missing_tensors:
            parts = [f"metadata {missing_meta}"] if missing_meta else []
            parts += [f"tensors {missing_tensors}"] if missing_tensors else []
            raise ArtifactError(f"{path} is a damaged pseudolabel artifact: missing {' and '.join(parts)}")
        fields = {k: _parse_meta(path, k, meta[k]) for k in _META_TYPES}
        names = fields["classnames"]
        if classnames is not None and list(classnames) != names:
            raise ArtifactError(
                f"{path} was made for a different class vocabulary ({len(names)} classes vs {len(classnames)}: "
                f"{vocabulary_difference(list(classnames), names)})"
            )
        try:
            return cls(
                sample_ids=fields["sample_ids"],
                classnames=names,
                scores=tensors["scores"],
                labels=tensors["labels"],
                confidences=tensors["confidences"],
                indices=tensors["indices"],
                multilabel=fields["multilabel"],
                provenance=fields["provenance"],
                path=path,
            )
        except ArtifactError as err:
            raise ArtifactError(f"{path} is a damaged pseudolabel artifact: {err}") from err

    def aligned_to(self, sample_ids: list[str]) -> "PseudoLabels":
        """Reorder (and subset) to ``sample_ids``; ids absent from the artifact are an error."""
        pos = {s: i for i, s in enumerate(self.sample_ids)}
        missing = [s for s in sample_ids if s not in pos]
        if missing:
            raise ArtifactError(self._missing_message(missing, len(sample_ids)))
        order = torch.tensor([pos[s] for s in sample_ids], dtype=torch.long)
        return self._rows(order, list(sample_ids))

    def _missing_message(self, missing: list[str], wanted: int) -> str:
        """Which samples lack a pseudolabel, next to the artifact's own ids, so that a mismatch
        (another dataset, split or preprocessing) shows at a glance."""
        source = f"pseudolabel artifact {self.path}" if self.path is not None else "the pseudolabels"
        made = ", ".join(f"{k} {self.provenance[k]}" for k in ("method", "stage") if self.provenance.get(k))
        made = f" ids ({made})" if made else " ids"
        matched = f"none of the {wanted} requested" if len(missing) == wanted else f"{wanted - len(missing)} of {wanted}"
        return (
            f"{len(missing)} samples have no pseudolabel in {source} ({matched} sample ids match; the artifact holds "
            f"{len(self.sample_ids)}{made}), e.g. {missing[:3]}; the artifact's own ids look "
            f"like {self.sample_ids[:3]}. {self._mismatch_hint(missing)}"
        )

    def _mismatch_hint(self, missing: list[str]) -> str:
        """Why ids may not match. File-backed data has absolute sample ids; artifacts of earlier vlweak
        versions hold the image paths as they were spelled (often relative to the working folder)."""
        def tail(p: str) -> str:
            return p.replace("\\", "/").removeprefix("./")

        wanted = {tail(m) for m in missing[:2000]}
        for own in self.sample_ids[:200]:
            if own and not os.path.isabs(own) and any(w.endswith("/" + tail(own)) for w in wanted):
                return ("Its ids are image paths as they were spelled when it was made (relative); sample ids are "
                        "absolute paths now: re-run the method that wrote it to get an artifact that aligns.")
        return "Was it made for another dataset or split?"

