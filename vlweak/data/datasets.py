"""Dataset readers. Every item is a dict:

* ``image``: a PIL image or uint8 ``[3, H, W]`` tensor (before the backbone's transform),
* ``label``: class index (``-1`` = unknown) for single-label data, or
  ``target`` (float multi-hot ``[C]``) and ``mask`` (bool ``[C]``, ``True`` = observed) for multi-label data,
* ``index``: position of the item in its dataset (sample ids are ``dataset.sample_ids[index]``),
* ``caption``: for image-caption data (pretraining).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from vlweak.data.world import ShapesWorld, Task, label_of, multilabel_target
from vlweak.distributed import worker_start_method

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm")
#: folders that archive tools and file servers put beside or inside class folders: never classes or images
#: (macOS zip's __MACOSX, Synology's @eaDir thumbnails, NAS and Windows recycle bins)
SYSTEM_FOLDERS = frozenset({"__MACOSX", "@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information"})


def _is_listed(name: str) -> bool:
    """Whether a folder named ``name`` holds data (hidden and system folders do not)."""
    return not name.startswith(".") and name not in SYSTEM_FOLDERS
#: manifest file suffixes (compared case-insensitively) and their formats
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}


class ImageLoadError(OSError):
    """An image file is missing or cannot be decoded (the message names the path)."""


class VocabularyError(ValueError):
    """A class list is empty or has blank or duplicate names, a label lies outside it, or labels that
    look like class indices come without one."""


def vocabulary_difference(ours: list[str], theirs: list[str]) -> str:
    """How class list ``theirs`` differs from ``ours``, for an error message: the names only one of
    them has (a few of each), or that the same names come in another order."""
    missing = [c for c in ours if c not in theirs]
    extra = [c for c in theirs if c not in ours]
    if not missing and not extra:
        return "same names, different order"
    return ", ".join(f"{what} {names[:5]}{' ...' if len(names) > 5 else ''}"
                     for what, names in (("missing", missing), ("extra", extra)) if names)


def clean_classname(name: str) -> str:
    """``"sweet_pepper"`` -> ``"sweet pepper"``: underscores to spaces, whitespace collapsed."""
    return " ".join(name.replace("_", " ").split())


def load_classnames(value: list[str] | dict[str, str] | str | os.PathLike | None) -> list[str] | dict[str, str] | None:
    """A class vocabulary given inline (a list, or a ``{folder: name}`` map) or as a file: ``.txt``
    (one name per line; blank lines and lines starting with ``#`` skipped), ``.json`` or
    ``.yaml`` / ``.yml`` (a list or a map). Inline values pass through."""
    if isinstance(value, dict):  # YAML reads a folder named 0 or 1997 as a number: names are text
        return {_name_text(k): _name_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_name_text(v) for v in value]
    if not isinstance(value, (str, os.PathLike)):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"class-name file not found: {path} (classnames is a list of names, a {{folder: name}} map, "
            "or a .txt / .json / .yaml file holding one)"
        )
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".yaml", ".yml"):
        raise ValueError(f"class-name file {path}: unknown format {suffix or '(no suffix)'!r} (.txt, .json, .yaml or .yml)")
    data = read_list_file(path)
    if isinstance(data, (list, dict)):
        try:
            return load_classnames(data)
        except ValueError as err:
            raise ValueError(f"class-name file {path}: {err}") from None
    raise ValueError(f"class-name file {path} holds a {type(data).__name__}: expected a list of names or a {{folder: name}} map")


def _name_text(value: Any) -> str:
    """A class or folder name as text: YAML and JSON numbers (a folder ``0``, a class ``1997``) as
    written; anything else (a nested list, a map, null) is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"class names are text (or numbers); got {value!r} ({type(value).__name__})")


def read_list_file(path: Path) -> Any:
    """A ``.txt`` file's lines (stripped; blank lines and lines starting with ``#`` skipped), or what
    a ``.json`` / ``.yaml`` / ``.yml`` file holds (the caller checks its type)."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: the byte-order mark spreadsheets and Notepad write
    if path.suffix.lower() == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    import yaml  # a superset of JSON

    return yaml.safe_load(text)


def validate_classnames(classnames: Sequence[str], source: str = "class list") -> list[str]:
    """Return the class names as a list; an empty list, a blank name or duplicate names (also names
    that differ only by surrounding whitespace) is a :class:`VocabularyError` naming the entries."""
    names = list(classnames)
    if not names:
        raise VocabularyError(f"{source} is empty: at least one class is needed")
    blank = [(k, n) for k, n in enumerate(names) if isinstance(n, str) and not n.strip()]
    if blank:
        where = ", ".join(f"{n!r} at position {k}" for k, n in blank)
        raise VocabularyError(f"{source} has blank class names ({where}): every class needs a name")
    groups: dict[Any, list[int]] = {}
    for k, n in enumerate(names):
        groups.setdefault(n.strip() if isinstance(n, str) else n, []).append(k)
    clashes = [pos for pos in groups.values() if len(pos) > 1]
    if clashes:
        where = "; ".join(", ".join(f"{names[k]!r} at position {k}" for k in pos) for pos in clashes)
        exact = sorted({names[k] for pos in clashes for k in pos if names.count(names[k]) > 1}, key=str)
        if exact:
            raise VocabularyError(f"{source} has duplicate class names: {exact} ({where})")
        raise VocabularyError(
            f"{source} has class names that differ only by surrounding whitespace ({where}): they name the same class"
        )
    # the prompts name a class by its cleaned name, and CLIP's tokenizers lower-case it
    prompts: dict[str, list[str]] = {}
    for n in names:
        if isinstance(n, str):
            prompts.setdefault(clean_classname(n), []).append(n)
    same = [group for group in prompts.values() if len(group) > 1]
    if same:
        raise VocabularyError(
            f"{source} has class names that make the same prompt ({'; '.join(' and '.join(map(repr, g)) for g in same)}: "
            "underscores read as spaces): one of each could never be predicted; give them distinct names "
            "(a classnames map)"
        )
    cased: dict[str, list[str]] = {}
    for cleaned in prompts:
        cased.setdefault(cleaned.casefold(), []).append(cleaned)
    alike = [group for group in cased.values() if len(group) > 1]
    if alike:
        rank_zero_warn(
            f"{source} has class names that differ only in case ({'; '.join(' and '.join(map(repr, g)) for g in alike)}): "
            "CLIP's tokenizers lower-case the prompts, so their scores are identical",
            stacklevel=2,
        )
    return names


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale images as 8-bit ``L``, scaled by the range of their
    type (``convert("RGB")`` clips such values to 255 instead): ``I;16`` /257; ``I`` clipped to
    0..65535, then /257 if above 255; ``F`` taken as [0, 1] if at most 1, else as [0, 255]."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float64) / 257.0
    elif img.mode == "I":
        a = np.clip(np.asarray(img).astype(np.float64), 0, 65535)
        if a.size and a.max() > 255:
            a /= 257.0
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1:
            a *= 255.0
    else:
        return img
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, raising :class:`ImageLoadError` with the path if it is missing or corrupt."""
    try:
        with Image.open(path) as img:
            return _to_8bit(img).convert("RGB")
    except FileNotFoundError as err:
        raise ImageLoadError(f"image not found: {path}") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"image {path} is larger than PIL opens by default ({err}); for real images this large, raise "
            "PIL.Image.MAX_IMAGE_PIXELS before the run (skip_bad: true skips it instead)"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot decode image {path}: {err}") from err


def load_or_skip(path: str | os.PathLike, skip_bad: bool) -> Image.Image | None:
    """:func:`load_image`; with ``skip_bad`` an unreadable image is a warning naming it and ``None``."""
    try:
        return load_image(path)
    except ImageLoadError as err:
        if not skip_bad:
            raise ImageLoadError(f"{err} (skip_bad: true skips unreadable images, each with a warning)") from err.__cause__
        # every process warns of its own images (a rank's skipped image is no other rank's)
        warnings.warn(f"skipping unreadable image {path}", stacklevel=3)
        return None


def absolute_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """``os.path.abspath`` of each path (against the current folder, ``..`` and ``.`` folded,
    symlinks not resolved)."""
    cwd = os.getcwd()
    return [os.path.normpath(os.path.join(cwd, os.fspath(p))) for p in paths]


def first_listings(paths: Sequence[str], labels: Sequence[Any], where: Callable[[int], str], source: str) -> list[int]:
    """The entries to keep of a listing that may name an image more than once (a repeated manifest
    row, a COCO file under two image ids, a VOC id listed twice): the first of each image. A repeat
    with the same labels is dropped with a warning; one with other labels is an error naming both
    entries (which is right cannot be told). ``where(i)`` names entry ``i`` (``"row 5"``)."""
    first: dict[str, int] = {}
    keep, repeats = [], []
    for i, path in enumerate(absolute_paths(paths)):
        j = first.setdefault(path, i)
        if j == i:
            keep.append(i)
        elif labels[i] != labels[j]:
            raise VocabularyError(
                f"{source}: {path} is listed twice with different labels ({where(j)}: {labels[j]}; {where(i)}: "
                f"{labels[i]}): list each image once"
            )
        else:
            repeats.append(i)
    if repeats:
        rank_zero_warn(f"{source}: {len(repeats)} entries repeat an image listed before (e.g. {where(repeats[0])}, "
                      f"{paths[repeats[0]]}): each image is read once", stacklevel=3)
    return keep


class VisionDataset(Dataset):
    """Base of the file-backed readers: ``paths`` plus labels, with skip-on-error support."""

    multilabel: bool = False

    def __init__(self, paths: list[str], classnames: list[str], skip_bad: bool = False) -> None:
        self.paths = absolute_paths(paths)
        self.classnames = classnames
        self.skip_bad = skip_bad

    @property
    def sample_ids(self) -> list[str]:
        """Absolute, normalized image paths (symlinks kept): the same whatever the spelling of the
        root and the working directory, so artifacts of one run align with another's."""
        return list(self.paths)  # made absolute at construction

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> Image.Image | None:
        return load_or_skip(self.paths[index], self.skip_bad)

    def fingerprint_parts(self) -> dict[str, Any]:
        """What identifies this dataset's content for the embedding cache: each file's size,
        modification and change times (ns) and inode. The change time and inode catch what the
        modification time alone misses: a file replaced by one of the same size and time (``cp -p``,
        ``rsync -a``, ``touch -r``) or two files swapped by renaming."""
        stats = []
        for p in self.paths:
            try:
                st = os.stat(p)
                stats.append((str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            except OSError:
                stats.append((str(p), -1, -1, -1, -1))
        # skip_bad changes what is encoded (unreadable images left out instead of an error)
        return {"type": type(self).__name__, "files": stats, "skip_bad": bool(self.skip_bad)}


class LabeledImages(VisionDataset):
    """Images with one class index each (``-1`` = unknown) or, multi-label, the list of classes
    present (``[]``: none; ``None``: unlabeled, every class unknown)."""

    def __init__(
        self,
        paths: list[str],
        labels: list[int] | list[list[int] | None],
        classnames: list[str],
        multilabel: bool = False,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(paths, classnames, skip_bad)
        self.labels = labels
        self.multilabel = multilabel

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self._image(index)
        if image is None:
            return None
        item: dict[str, Any] = {"image": image, "index": index}
        if self.multilabel:
            labs = self.labels[index]
            target = torch.zeros(len(self.classnames))
            target[list(labs or [])] = 1.0
            item["target"] = target
            item["mask"] = torch.full((len(self.classnames),), labs is not None, dtype=torch.bool)
        else:
            item["label"] = int(self.labels[index])
        return item

    def targets(self) -> torch.Tensor:
        if self.multilabel:
            t = torch.zeros(len(self), len(self.classnames))
            for i, labs in enumerate(self.labels):
                t[i, list(labs or [])] = 1.0
            return t
        return torch.as_tensor(self.labels, dtype=torch.long)

    def masks(self) -> torch.Tensor:
        """Which entries are known: multi-label ``[N, C]`` (an unlabeled row all false), single-label
        ``[N, 1]`` (a label ``-1`` unknown)."""
        if self.multilabel:
            known = torch.tensor([labs is not None for labs in self.labels], dtype=torch.bool)
            return known[:, None].expand(-1, len(self.classnames)).clone()
        return (torch.as_tensor(self.labels, dtype=torch.long) >= 0)[:, None]


def _nfc(name: str) -> str:
    """``name`` in Unicode's composed form (NFC): how names are typed, and how macOS file systems
    do not store accented folder names."""
    import unicodedata

    return unicodedata.normalize("NFC", name)


def list_class_folders(root: Path) -> list[str]:
    """The sorted names of the class folders of ``root`` (its sub-folders; hidden ones and those of
    archive tools and file servers, :data:`SYSTEM_FOLDERS`, left out)."""
    # sorted in one Unicode form: a split copied from macOS (decomposed accents) keeps the class order
    return sorted((d.name for d in root.iterdir() if d.is_dir() and _is_listed(d.name)), key=_nfc)


def _refuse_numbers_in_text_order(root: Path, folders: list[str]) -> None:
    """Class folders named by numbers (``1`` ... ``102``) sort as text (``1, 10, 100, 101, 102, 11``):
    a list of names in class-id order would go to the wrong folders, so a list is refused for them."""
    if len(folders) < 2 or not all(f.strip().isdigit() for f in folders):
        return
    if folders != sorted(folders, key=lambda f: int(f)):
        raise VocabularyError(
            f"the class folders of {root} are numbers, and a classnames list names the folders in their sorted "
            f"text order ({', '.join(folders[:4])}, ...), not by number: give a {{folder: name}} map "
            "(e.g. {'1': name, '2': name}; a .json / .yaml file)"
        )


class ImageFolderReader:
    """``root/<class>/<image>``: one sub-folder per class; class names from folder names
    (cleaned) unless ``classnames`` maps folder names to names.

    A folder that holds images but no class sub-folders is a folder of unlabeled images (label
    ``-1``, to be pseudolabelled): ``classnames`` then gives the class vocabulary."""

    @staticmethod
    def read(
        root: str | os.PathLike, classnames: dict[str, str] | list[str] | None = None, skip_bad: bool = False
    ) -> LabeledImages:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if classnames is not None and len(classnames) == 0:
            # an explicit empty list/map is a mistake, not "use the folder names" (that is None)
            raise VocabularyError(
                f"classnames for image folder {root} is empty: give one name per class folder, "
                "or leave it unset to use the folder names"
            )
        folders = list_class_folders(root)
        if not folders:
            return ImageFolderReader._unlabeled(root, classnames, skip_bad)
        if isinstance(classnames, dict):
            # a folder name as the file system spells it (macOS: decomposed accents) against the map's
            # keys as typed: compared in one Unicode form
            keys = {_nfc(k): v for k, v in classnames.items()}
            unknown = [f for f in folders if _nfc(f) not in keys]
            if unknown:
                raise VocabularyError(f"class folders {unknown[:5]} of {root} have no entry in the class-name map")
            names = [keys[_nfc(f)] for f in folders]
        elif classnames is not None:
            names = validate_classnames(classnames, f"classnames given for {root}")
            if len(names) != len(folders):
                raise VocabularyError(f"{len(names)} class names given for {len(folders)} class folders in {root}")
            folder_names = [clean_classname(_nfc(f)) for f in folders]
            fold, folder_fold = [n.casefold() for n in names], [n.casefold() for n in folder_names]
            if fold != folder_fold and sorted(fold) == sorted(folder_fold):
                # the folders' own names in another order: each folder would take another's name
                raise VocabularyError(
                    f"classnames for {root} lists its class folders in another order ({names}); a list names "
                    f"the folders in their sorted order ({folder_names}): give it in that order, or map "
                    "folder to name ({folder: name})"
                )
            _refuse_numbers_in_text_order(root, folders)
            if not set(fold) & set(folder_fold):  # nothing to check the pairing by: show it
                pairs = ", ".join(f"{f} -> {n}" for f, n in list(zip(folders, names))[:6])
                rank_zero_info(f"class folders of {root} take the classnames in sorted folder order: {pairs}"
                               f"{' ...' if len(folders) > 6 else ''} (a {{folder: name}} map pairs them explicitly)")
        else:
            names = [clean_classname(_nfc(f)) for f in folders]
            wnids = [f for f in folders if re.fullmatch(r"n\d{8}", f)]
            if len(wnids) > len(folders) // 2:
                rank_zero_warn(
                    f"the class folders of {root} are WordNet ids ({wnids[:3]} ...): the prompts would read "
                    f"'a photo of a {wnids[0]}.'; give classnames, a {{folder: name}} map (a .json / .yaml / .txt file)",
                    stacklevel=2,
                )
            numbers = [f for f in folders if f.strip().isdigit()]
            if len(numbers) > len(folders) // 2:
                rank_zero_warn(
                    f"the class folders of {root} are numbers ({numbers[:3]} ...): the prompts would read "
                    f"'a photo of a {numbers[0]}.'; give classnames as a {{folder: name}} map (a .json / .yaml file)",
                    stacklevel=2,
                )
        names = validate_classnames(names, f"classes of {root}")
        paths, labels, empty = [], [], []
        for k, folder in enumerate(folders):
            n = len(paths)
            for f in image_files(root / folder, recursive=True):
                paths.append(str(f))
                labels.append(k)
            if len(paths) == n:
                empty.append(f"{root / folder} ({names[k]!r})")
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        loose = image_files(root)
        if loose:  # beside the class folders: of no class, and not read
            rank_zero_warn(
                f"{len(loose)} image{'s' if len(loose) > 1 else ''} directly in {root} (e.g. {loose[0].name}) "
                f"{'are' if len(loose) > 1 else 'is'} in no class folder and left out; move them into their class folders",
                stacklevel=2,
            )
        if empty:
            # a class absent from one split is legitimate (the vocabulary is shared by all splits)

            rank_zero_warn(
                f"{len(empty)} class folder{'s' if len(empty) > 1 else ''} of {root} "
                f"{'have' if len(empty) > 1 else 'has'} no images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}",
                stacklevel=2,
            )
        return LabeledImages(paths, labels, names, skip_bad=skip_bad)

    @staticmethod
    def _unlabeled(root: Path, classnames: dict[str, str] | list[str] | None, skip_bad: bool) -> LabeledImages:
        paths = [str(f) for f in image_files(root)]
        if not paths:
            raise VocabularyError(f"image folder {root} has no class sub-folders and no images ({', '.join(IMAGE_EXTENSIONS)})")
        if classnames is None:
            raise VocabularyError(
                f"image folder {root} holds {len(paths)} images but no class sub-folders: to pseudolabel them "
                "as unlabeled images, give classnames (the class vocabulary, e.g. [cat, dog])"
            )
        names = list(classnames.values()) if isinstance(classnames, dict) else list(classnames)
        names = validate_classnames(names, f"classnames given for the unlabeled images of {root}")
        return LabeledImages(paths, [-1] * len(paths), names, skip_bad=skip_bad)


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files directly in ``folder``, sorted; hidden files (macOS ``._x.png`` resource
    forks, ``.DS_Store``) are not images. ``recursive``: those of its sub-folders too (hidden
    and :data:`SYSTEM_FOLDERS` left out), each folder's own first, as torchvision's ``ImageFolder`` reads a class."""
    def images(paths: list[Path]) -> list[Path]:
        return [f for f in sorted(paths) if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")]

    if not recursive:
        return images(list(folder.iterdir()))
    found = []
    seen = set()  # folders by identity: a link back up the tree (``ln -s . again``) is walked once
    for here, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if _is_listed(d))
        found += images([Path(here) / f for f in files])
    return found


def manifest_format(path: Path) -> str:
    """``csv``, ``jsonl`` or ``json`` from the manifest's suffix (any case); another suffix is an error."""
    fmt = MANIFEST_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"manifest {path}: unknown format {path.suffix or '(no suffix)'!r} "
            f"(supported: {', '.join(MANIFEST_FORMATS)}, in any case)"
        )
    return fmt


def _json_lines(path: Path, text: str) -> list[Any]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: invalid JSON ({err})") from err
    return rows


def _manifest_text(path: Path) -> str:
    """A manifest's text: UTF-8 (a spreadsheet's byte-order mark dropped) or UTF-16 with its mark
    (Excel's "Unicode text"); another encoding is refused with its position, not a traceback."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"manifest {path} is not {encoding.split('-sig')[0].upper()} text: byte {data[err.start:err.start + 1]!r} "
            f"at line {line} (a spreadsheet saved in a local encoding such as Latin-1?); save it as UTF-8 (CSV UTF-8)"
        ) from None


def _column_name(name: str) -> str:
    """A CSV header cell as a column name: stripped; ``path`` / ``label`` / ``labels`` in any case."""
    name = name.strip()
    return name.lower() if name.lower() in ("path", "label", "labels") else name


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a manifest: CSV with a header, JSON Lines (one object a line) or JSON (an array
    of objects, or JSON Lines in a ``.json`` file)."""
    fmt = manifest_format(path)
    text = _manifest_text(path)
    if fmt == "csv":
        header = text.split("\n", 1)[0]
        # a spreadsheet in a locale whose list separator is ';' (or a tab-separated export)
        delimiter = "," if "," in header else next((d for d in ";\t" if d in header), ",")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        if reader.fieldnames:
            # the space after a comma ("path, label") is not part of a column's name, nor the case of
            # vlweak's own columns ("Path", "Label")
            reader.fieldnames = [_column_name(name) for name in reader.fieldnames]
        return list(reader)
    rows: Any = None
    if fmt == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # not one JSON document: JSON Lines
        if isinstance(rows, dict):
            rows = [rows]  # one object: a one-line JSON Lines file
        elif rows is not None and not isinstance(rows, list):
            raise ValueError(f"manifest {path} holds a JSON {type(rows).__name__}, expected an array of row objects")
    if rows is None:
        rows = _json_lines(path, text)
    bad = [k for k, r in enumerate(rows, 1) if not isinstance(r, dict)]
    if bad:
        raise ValueError(
            f"manifest {path}: row {bad[0]} is a JSON {type(rows[bad[0] - 1]).__name__}, "
            "expected an object with a 'path' key"
        )
    return rows


def _no_label(value: Any) -> bool:
    """A manifest row's label value that gives none: a missing key (``None``) or a blank cell."""
    return value is None or (isinstance(value, str) and not value.strip())


def _split_labels(value: Any) -> list[str]:
    if _no_label(value):
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, int):
        return [str(value)]
    text = str(value).strip()
    if text.startswith("["):  # a JSON list in a CSV cell
        try:
            return [str(v) for v in json.loads(text)]
        except json.JSONDecodeError:
            pass
    return [v.strip() for v in text.replace(";", "|").split("|") if v.strip()]


def _split_commas(labels: list[str], known: set[str] | None) -> list[str]:
    """A multi-label cell's names separated by commas (``"circle,square"``), unless the whole name is a
    given class (a class name that holds a comma needs ``classnames``)."""
    out = []
    for lab in labels:
        if "," in lab and (known is None or lab not in known):
            out += [part.strip() for part in lab.split(",") if part.strip()]
        else:
            out.append(lab)
    return out


def _check_root(manifest: Path, listed: list[str], base: Path, root: Any) -> None:
    """A manifest whose first relative paths are all missing under ``base`` names them against
    another folder: refused, naming the folder they were resolved against (and the working folder,
    when they are there), before a run skips or fails on every image."""
    sample = [p for p in listed if not Path(p).expanduser().is_absolute()][:20]
    if not sample or any((base / p).exists() for p in sample):
        return
    here = sum(Path(p).exists() for p in sample)
    hint = (f"they are relative to the working folder ({os.getcwd()}): pass --data.init_args.root=. (or absolute paths)"
            if here else "set root to the folder they are relative to")
    raise FileNotFoundError(
        f"manifest {manifest}: none of its first {len(sample)} relative image paths (e.g. {sample[0]}) is in "
        f"{base}, the folder they resolve against ({'root' if root else 'the manifest folder; root unset'}); {hint}"
    )


class ManifestReader:
    """CSV, JSONL or JSON (an array of objects) manifests with a ``path`` column/key and a ``label``
    (one class) or ``labels`` (several: a JSON list, or names separated by ``|``, ``;`` or ``,``) column. Relative paths
    resolve against ``root`` (default: the manifest's folder). A label may be a class name or a class
    index (then ``classnames`` must be given)."""

    @staticmethod
    def read(
        manifest: str | os.PathLike,
        classnames: list[str] | None = None,
        root: str | os.PathLike | None = None,
        multilabel: bool | None = None,
        skip_bad: bool = False,
        caption_key: str | None = None,
    ) -> LabeledImages:
        manifest = Path(manifest).expanduser()
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {manifest}")
        rows = _read_rows(manifest)
        if not rows:
            raise ValueError(f"manifest {manifest} has no rows")
        if "path" not in rows[0]:
            raise ValueError(f"manifest {manifest} needs a 'path' column; found {sorted(rows[0])}")
        if caption_key and caption_key not in rows[0]:
            raise ValueError(f"manifest {manifest} has no caption column {caption_key!r}; found {sorted(rows[0])}")
        key = "labels" if any("labels" in r for r in rows) else "label" if any("label" in r for r in rows) else None
        others = sorted({k for r in rows for k in r} - {"path", "label", "labels", caption_key})
        if key is None and not caption_key:
            where = f"manifest {manifest} has no 'label' (one class) or 'labels' (several) column; found {sorted(rows[0])}"
            if classnames is None:
                raise ValueError(f"{where}: name its label column so, or give classnames to pseudolabel its "
                                 "images as unlabeled")
            if others:  # a label column under another name would leave every image unlabeled
                rank_zero_warn(f"{where}: its {len(rows)} images are read as unlabeled", stacklevel=2)
        elif key is not None and others:
            missing = [n for n, r in enumerate(rows, 1) if key not in r and any(k in r for k in others)]
            if missing:  # a JSON row with a misspelled key
                rank_zero_warn(
                    f"manifest {manifest}: {len(missing)} rows (e.g. row {missing[0]}) have no {key!r} but other "
                    f"keys ({others[:5]}): read as unlabeled",
                    stacklevel=2,
                )
        if multilabel is None:
            multilabel = key == "labels"
        raw = [_split_labels(r.get(key)) if key else [] for r in rows]
        if key == "labels":
            raw = [_split_commas(labs, None if classnames is None else set(classnames)) for labs in raw]
        # no label at all (no label column or key, an empty cell): unlabeled, not "no class present",
        # which a multi-label row says with an empty list ("[]")
        unlabeled = [not key or _no_label(r.get(key)) for r in rows]
        if classnames is None:
            found = {lab for labs in raw for lab in labs}
            if found and all(re.fullmatch(r"\s*-?[0-9]+\s*", lab) for lab in found):
                raise VocabularyError(
                    f"the labels of manifest {manifest} look like class indices (e.g. "
                    f"{sorted(found, key=lambda lab: int(lab))[:5]}): give `classnames` (the class names "
                    "in index order), the class vocabulary cannot be read from numbers"
                )
            names = sorted(found)
            if not names and key and not caption_key:
                raise VocabularyError(
                    f"manifest {manifest}: no row has a label in its {key!r} column, so there is no class "
                    "vocabulary to read: give classnames to pseudolabel its images as unlabeled"
                )
            blank = [n for n in names if n.strip().lower() in ("nan", "none", "null", "n/a", "na")]
            if blank:  # a missing value written out as text by a data-frame library
                rank_zero_warn(f"manifest {manifest}: label {blank[0]!r} reads like a missing value written as text, "
                               "and is taken as a class of its own: leave the cell empty for an unlabeled image, or give "
                               "classnames", stacklevel=2)
        else:
            names = list(classnames)
        if names or not caption_key:  # image-caption pairs may come without classes
            names = validate_classnames(names, f"class list of {manifest}")
        index = {n: k for k, n in enumerate(names)}
        base = Path(root).expanduser() if root else manifest.parent
        paths, labels, listed = [], [], []
        first = 2 if manifest_format(manifest) == "csv" else 1
        for n, (row, labs, none) in enumerate(zip(rows, raw, unlabeled), start=first):
            if not str(row.get("path") or "").strip():
                raise ValueError(f"{manifest} row {n}: no image path (every row needs a non-empty 'path')")
            if caption_key and not str(row.get(caption_key) or "").strip():
                raise ValueError(f"{manifest} row {n} ({row['path']}): no caption in column {caption_key!r}")
            ids = []
            for lab in labs:
                if lab in index:
                    ids.append(index[lab])
                elif lab.lstrip("-").isdigit() and (0 if multilabel else -1) <= int(lab) < len(names):
                    ids.append(int(lab))
                else:
                    raise VocabularyError(
                        f"{manifest} row {n} ({row['path']}): label {lab!r} is not in the class vocabulary "
                        f"({len(names)} classes, e.g. {names[:5]})"
                    )
            if not multilabel and len(ids) > 1:
                raise VocabularyError(f"{manifest} row {n} ({row['path']}): several labels in a single-label manifest")
            if multilabel:
                ids = sorted(set(ids))  # a label set: its order and repeats say nothing
            text = str(row["path"]).strip()
            listed.append(text)
            if "://" in text:
                raise ValueError(f"{manifest} row {n}: {text} is a URL; vlweak reads image files: download the "
                                 "images and list their local paths")
            p = Path(text).expanduser()
            paths.append(str(p if p.is_absolute() else base / p))
            labels.append((None if none else ids) if multilabel else (ids[0] if ids else -1))
        _check_root(manifest, listed, base, root)
        if caption_key:  # image-caption pairs: an image may come with several captions
            return CaptionedImages(LabeledImages(paths, labels, names, multilabel=multilabel, skip_bad=skip_bad),
                                   [str(r[caption_key]) for r in rows])
        keep = first_listings(paths, labels, lambda i: f"row {i + first}", f"manifest {manifest}")
        return LabeledImages([paths[i] for i in keep], [labels[i] for i in keep], names, multilabel=multilabel,
                             skip_bad=skip_bad)


class CaptionedImages(Dataset):
    """Image-caption pairs for contrastive pretraining, wrapping a reader."""

    multilabel = False

    def __init__(self, images: VisionDataset, captions: list[str]) -> None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions = images, captions
        self.classnames = images.classnames

    @property
    def sample_ids(self) -> list[str]:
        return self.images.sample_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.images._image(index)
        return None if image is None else {"image": image, "caption": self.captions[index], "index": index}

    def fingerprint_parts(self) -> dict[str, Any]:
        return dict(self.images.fingerprint_parts(), captions=len(self.captions))


class ShapesWorldDataset(Dataset):
    """``n`` items of one split of the built-in world (see :mod:`vlweak.data.world`).

    A scene is drawn once: its image, caption and labels are kept in memory (up to
    ``memo_bytes`` of images, 256 MiB by default: every item of the world at 64 px up to about
    21,000 images), so later epochs, label lookups and rescans read them instead of drawing again.
    A loader worker keeps what it draws for its own later reads; what the main process drew before
    the workers started (the budget's labels, for one) every worker shares.
    """

    def __init__(
        self,
        world: ShapesWorld,
        split: str,
        n: int,
        task: Task = "shape",
        classnames: list[str] | None = None,
        memo_bytes: int = 256 * 2**20,
    ) -> None:
        from vlweak.data.world import classnames_for, split_id

        split_id(split)  # an unknown split fails here, naming the valid ones
        self.world, self.split, self.n, self.task = world, split, n, task
        self.multilabel = world.multilabel
        if classnames is None:
            classnames = classnames_for("shape") if world.multilabel else classnames_for(task)
        self.classnames = validate_classnames(classnames, "classnames of the shapes world")
        self.memo_items = memo_bytes // (3 * world.image_size**2)
        self._memo: dict[int, tuple[torch.Tensor, str, Any]] = {}

    @property
    def sample_ids(self) -> list[str]:
        # the world's parameters are part of the id: an artifact of another draw must not align
        w = self.world
        world = f"shapes-s{w.seed}-shift{w.shift:g}-{w.image_size}px" + (f"-multi{w.max_objects}" if w.multilabel else "")
        return [f"{world}/{self.split}/{i}" for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def _drawn(self, index: int) -> tuple[torch.Tensor, str, Any]:
        """Scene ``index``'s image (``[3, H, W]`` uint8), caption and label (or multi-label target)."""
        got = self._memo.get(index)
        if got is None:
            scene = self.world.scene(self.split, index)
            label = multilabel_target(scene) if self.multilabel else label_of(scene, self.task)
            got = (torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(), scene.caption, label)
            if len(self._memo) < self.memo_items:
                self._memo[index] = got
        return got

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, caption, label = self._drawn(index)
        # copies: a transform or a collate that writes into its input must not change the memo
        item: dict[str, Any] = {"image": image.clone(), "index": index, "caption": caption}
        if self.multilabel:
            item["target"] = label.clone()
            item["mask"] = torch.ones(len(self.classnames), dtype=torch.bool)
        else:
            item["label"] = label
        return item

    def targets(self) -> torch.Tensor:
        labels = [self._drawn(i)[2] for i in range(self.n)]
        return torch.stack(labels) if self.multilabel else torch.tensor(labels)

    def __getstate__(self) -> dict[str, Any]:
        # a loader started by spawning, or a copy sent to another process, draws its scenes anew
        # rather than carrying this process's memo through a pickle
        return dict(self.__dict__, _memo={})

    def fingerprint_parts(self) -> dict[str, Any]:
        w = self.world
        return {
            "type": "shapes-world",
            "seed": w.seed,
            "size": w.image_size,
            "shift": w.shift,
            "multilabel": w.multilabel,
            "max_objects": w.max_objects,
            "split": self.split,
            "n": self.n,
            # captions only: a world without misnaming keeps its earlier fingerprint
            **({"misnaming": w.misnaming, "misnaming_rate": w.misnaming_rate} if w.misnaming else {}),
        }


class Transformed(Dataset):
    """Apply ``transform`` to each item's ``image`` (and keep everything else)."""

    def __init__(self, dataset: Dataset, transform: Callable | None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is not None and self.transform is not None:
            item = dict(item, image=self.transform(item["image"]))
        return item

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "transform"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SampleIndices(Dataset):
    """Items that are sample indices alone (``{"index": i}``, in the order given): the train split
    of a method that trains on features it keeps, so that no image is read."""

    def __init__(self, indices: Sequence[int] | torch.Tensor) -> None:
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {"index": self.indices[position]}


class LabelsOfKept(Dataset):
    """A multi-label train split whose images a method keeps the features of: once the method flags
    a sample (``kept[index] = True``), its item is its labels alone (``index``, ``target``,
    ``mask``, from the dataset's label tables) and its image is neither read nor decoded again.

    The flags live in shared memory, so loader workers, persistent ones included, see what the
    training process flags. Items of samples not flagged are the dataset's own, cut to the same
    keys and ``image``; :func:`collate` batches the two kinds together (``image_rows``).
    """

    KEYS = ("index", "target", "mask")

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.labels = dataset.targets()  # type: ignore[attr-defined]
        masks = getattr(dataset, "masks", None)
        self.masks = masks().bool() if masks is not None else torch.ones(self.labels.shape, dtype=torch.bool)
        self.kept = torch.zeros(len(self.labels), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self.kept[index]:
            return {"index": index, "target": self.labels[index].clone(), "mask": self.masks[index].clone()}
        item = self.dataset[index]
        return None if item is None else {k: item[k] for k in (*self.KEYS, "image")}

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "labels", "masks", "kept"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def data_loader(dataset: Dataset, num_workers: int = 0, *, loader: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
    """Every vlweak loader: ``loader(dataset, num_workers=..., **kwargs)`` with :func:`collate`
    unless ``collate_fn`` is given, and workers started as
    :func:`~vlweak.distributed.worker_start_method` says (a fork server in a gloo rank)."""
    kwargs.setdefault("collate_fn", collate)
    return loader(dataset, num_workers=num_workers, multiprocessing_context=worker_start_method(num_workers), **kwargs)


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Default collate that drops items skipped as unreadable (``None``). When only some items carry
    an ``image`` (:class:`LabelsOfKept`), ``image`` stacks theirs and ``image_rows`` says which
    rows of the batch they are."""
    from torch.utils.data import default_collate

    kept = [it for it in items if it is not None]
    if not kept:
        return {}
    rows = [i for i, it in enumerate(kept) if "image" in it]
    if 0 < len(rows) < len(kept):
        batch = default_collate([{k: v for k, v in it.items() if k != "image"} for it in kept])
        batch["image"] = default_collate([kept[i]["image"] for i in rows])
        batch["image_rows"] = torch.tensor(rows)
        return batch
    return default_collate(kept)
