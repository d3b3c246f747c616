"""ImageNet as people have it on disk, found from what is in `--dataset_dir`:

- folders: `train/<wnid>/*` and `val/<wnid>/*` (the layout the suite always read);
- a flat `val/` of 50,000 JPEGs with its labels beside it, in the devkit archive
  (`ILSVRC2012_devkit_t12.tar.gz`) or in Kaggle's `LOC_val_solution.csv`: labels are read from there,
  nothing is copied or moved;
- Kaggle's tree: `ILSVRC/Data/CLS-LOC/{train,val}` with `LOC_val_solution.csv` (and
  `LOC_synset_mapping.txt`) at the top;
- the three official archives (`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar` and the devkit):
  unpacked once by `prepare_archives` into `train/<wnid>/` and a flat `val/`, which is then the second
  layout.

Every layout gives the same images in the same order (validation images sorted by class, then file name,
as in class folders), so results computed from one are reused from another."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import platform
import re
import shutil
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from influence.results import locking
from influence.runtime.cli import UserError

logger = logging.getLogger("layouts")

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT_ARCHIVE)
# What torchvision.datasets.ImageNet reads from the devkit: the synsets (ILSVRC2012_ID, WNID, words, gloss,
# num_children, ...; the 1,000 classes are the leaves) and one ILSVRC2012_ID per validation image, in
# file-name order.
DEVKIT_META = "data/meta.mat"
DEVKIT_VAL_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_ROOT = Path("ILSVRC") / "Data" / "CLS-LOC"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
PREPARED_MARKER = ".imagenet_prepared"  # written last by prepare_archives: its presence means finished
STAGING = ".imagenet_preparing"
WNID = re.compile(r"n\d{8}")
# The first Python 3.11 whose tarfile has the 'data' extraction filter (3.10.12 and 3.9.17 have it too).
DATA_FILTER_PYTHON = "3.11.4"


@dataclasses.dataclass(frozen=True)
class DataLayout:
    kind: str  # "folders", "devkit" (flat val labelled by the devkit), "kaggle_csv" (flat val labelled by the CSV)
    train_dir: Path
    val_dir: Path
    labels_file: Optional[Path] = None  # for a flat val
    names_file: Optional[Path] = None  # readable class names: the devkit or Kaggle's synset mapping


def _reason(error: BaseException) -> str:
    """An exception as one short line (tarfile's messages can span several)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0].rstrip(':')}"


def is_hidden(name: str) -> bool:
    """What a file manager or notebook leaves behind (.ipynb_checkpoints, __MACOSX, AppleDouble `._x.JPEG`
    files of metadata beside each image): never a class, never an image."""
    return name.startswith((".", "__MACOSX"))


def is_image(name: str) -> bool:
    """Whether the file `name` (a path, or a member of a tar) is an image by its extension, not a hidden one."""
    base = os.path.basename(name)
    return not is_hidden(base) and base.lower().endswith(IMG_EXTENSIONS)


def flat_images(folder: Path) -> List[str]:
    """File names of the images directly in `folder`, sorted."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and is_image(entry.name))


def class_folders(folder: Path) -> List[str]:
    """Names of the folders directly in `folder` that can be classes (not hidden ones), sorted."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not is_hidden(entry.name))


def archives_present(dataset_dir: Path) -> List[str]:
    return [name for name in ARCHIVES if (dataset_dir / name).exists()]


def needs_unpacking(dataset_dir: Path) -> bool:
    """Image archives here and no train/ and val/ folders beside them (unpacked by us or by hand)."""
    has_images = any((dataset_dir / name).exists() for name in (TRAIN_ARCHIVE, VAL_ARCHIVE))
    unpacked = (dataset_dir / PREPARED_MARKER).exists() or ((dataset_dir / "train").is_dir() and (dataset_dir / "val").is_dir())
    return has_images and not unpacked


def find_layout(dataset_dir: Path) -> DataLayout:
    """The layout of `dataset_dir`, or one line saying what is missing."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"dataset directory {dataset_dir} does not exist")
    if needs_unpacking(dataset_dir):
        raise UserError(
            f"{dataset_dir} holds ImageNet's archives, not yet unpacked: `analyze.py --dataset_dir {dataset_dir}` "
            "unpacks them once"
        )
    base = dataset_dir / KAGGLE_ROOT if (dataset_dir / KAGGLE_ROOT).is_dir() else dataset_dir
    train_dir, val_dir = base / "train", base / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise UserError(
                f"{split_dir} is missing: the dataset directory must hold train/ and val/ (train with one folder "
                f"per class; val with one folder per class, or flat beside {DEVKIT_ARCHIVE} or {KAGGLE_VAL_CSV}), "
                f"Kaggle's {KAGGLE_ROOT}/, or ImageNet's three archives"
            )
    synsets = dataset_dir / KAGGLE_SYNSETS
    devkit, solution = dataset_dir / DEVKIT_ARCHIVE, dataset_dir / KAGGLE_VAL_CSV
    names_file = devkit if devkit.is_file() else synsets if synsets.is_file() else None
    if class_folders(val_dir) or not flat_images(val_dir):
        return DataLayout("folders", train_dir, val_dir, names_file=names_file)
    if devkit.is_file():
        return DataLayout("devkit", train_dir, val_dir, devkit, names_file)
    if solution.is_file():
        return DataLayout("kaggle_csv", train_dir, val_dir, solution, names_file)
    raise UserError(
        f"{val_dir} holds images but no class folders, and {dataset_dir} has neither {DEVKIT_ARCHIVE} nor "
        f"{KAGGLE_VAL_CSV} to label them: put one of them in {dataset_dir} (nothing is moved)"
    )


def _devkit_members(devkit: Path) -> Tuple[bytes, bytes]:
    """meta.mat and the validation ground truth, read from the devkit archive without unpacking it."""
    wanted = {DEVKIT_META: None, DEVKIT_VAL_GROUND_TRUTH: None}
    try:
        with tarfile.open(devkit) as archive:
            for member in archive:
                for suffix in wanted:
                    if member.isfile() and member.name.endswith(suffix):
                        wanted[suffix] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"{devkit} is not a readable devkit archive ({_reason(error)})") from None
    missing = [name for name, content in wanted.items() if content is None]
    if missing:
        raise UserError(f"{devkit} lacks {', '.join(missing)}: not ImageNet 2012's devkit")
    return wanted[DEVKIT_META], wanted[DEVKIT_VAL_GROUND_TRUTH]


def _devkit_synsets(meta: bytes) -> Tuple[Dict[int, str], Dict[str, str]]:
    """ILSVRC2012_ID -> wnid and wnid -> readable name (the first of its words) of the leaf synsets."""
    import scipy.io  # pylint: disable=import-outside-toplevel

    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    ids, names = {}, {}
    for row in synsets:
        ilsvrc_id, wnid, words, num_children = int(row[0]), str(row[1]), str(row[2]), int(row[4])
        if num_children == 0:
            ids[ilsvrc_id] = wnid
            names[wnid] = words.split(", ")[0]
    return ids, names


def flat_val_labels(layout: DataLayout) -> Dict[str, str]:
    """wnid of every image file in the flat val folder, from the devkit or the CSV; one line when they
    do not name exactly the files there."""
    files = flat_images(layout.val_dir)
    if layout.kind == "devkit":
        meta, ground_truth = _devkit_members(layout.labels_file)
        ids, _ = _devkit_synsets(meta)
        try:
            wnids = [ids[int(line)] for line in ground_truth.decode().split()]
        except (KeyError, ValueError):
            raise UserError(f"{layout.labels_file}: {DEVKIT_VAL_GROUND_TRUTH} names a class the devkit does not have") from None
        if len(wnids) != len(files):
            raise UserError(
                f"{layout.labels_file} labels {len(wnids)} validation images but {layout.val_dir} holds {len(files)}: "
                "the devkit labels the images in file-name order, so they must all be there"
            )
        return dict(zip(files, wnids))
    labels = read_solution_csv(layout.labels_file)
    missing = [name for name in files if Path(name).stem not in labels]
    if missing:
        raise UserError(
            f"{layout.labels_file} has no label for {len(missing)} of the {len(files)} images in {layout.val_dir} "
            f"(first: {missing[0]})"
        )
    return {name: labels[Path(name).stem] for name in files}


def read_solution_csv(path: Path) -> Dict[str, str]:
    """Kaggle's LOC_val_solution.csv: `ImageId,PredictionString` rows, the wnid first in each prediction."""
    labels: Dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet may add a byte-order mark
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise UserError(f"{path} is not Kaggle's {KAGGLE_VAL_CSV} (it needs ImageId and PredictionString columns)")
            for row in reader:
                words = (row["PredictionString"] or "").split()
                if not words:
                    raise UserError(f"{path}: no class for {row['ImageId']} (line {reader.line_num})")
                labels[row["ImageId"]] = words[0]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read {path} ({error})") from None
    return labels


def readable_names(layout: Optional[DataLayout]) -> Dict[str, str]:
    """wnid -> readable class name from the devkit or Kaggle's synset mapping; empty without either."""
    if layout is None or layout.names_file is None:
        return {}
    if layout.names_file.name == DEVKIT_ARCHIVE:
        return _devkit_synsets(_devkit_members(layout.names_file)[0])[1]
    names = {}
    for line in layout.names_file.read_text().splitlines():
        wnid, _, words = line.partition(" ")
        if wnid:
            names[wnid] = words.split(", ")[0]
    return names


def _check_archive(path: Path) -> None:
    if not tarfile.is_tarfile(path):
        raise UserError(f"{path} is not a tar archive (a partial download?); download it again")


def prepare_archives(dataset_dir: Path) -> bool:
    """Unpacks ImageNet's three archives in `dataset_dir` into train/<wnid>/ and a flat val/ (labelled by
    the devkit, which stays an archive), once: into a staging folder first, renamed when complete, so an
    interrupted preparation starts again instead of leaving half a dataset. Returns whether it worked."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir() or not needs_unpacking(dataset_dir):
        return False
    # Two runs (say, with different --analysis_name) may reach here for one archive folder: the second's
    # staging cleanup would delete the first's work. One unpacks; the other stops, naming it.
    busy = "it is unpacking ImageNet's archives there: run again once it has finished"
    with locking.hold(dataset_dir, busy_advice=busy, leave_no_file=True):
        if not needs_unpacking(dataset_dir):  # finished by another run between the check and the lock
            return False
        return _prepare_archives(dataset_dir)


def _prepare_archives(dataset_dir: Path) -> bool:
    if not hasattr(tarfile, "data_filter"):
        raise UserError(
            f"unpacking ImageNet's archives needs tarfile's 'data' filter, which Python {platform.python_version()} "
            f"lacks: use Python {DATA_FILTER_PYTHON} or newer, or unpack them by hand into train/<wnid>/ and val/"
        )
    present = archives_present(dataset_dir)
    missing = [name for name in ARCHIVES if name not in present]
    if missing:
        raise UserError(f"{dataset_dir} holds {', '.join(present)} but not {', '.join(missing)}: ImageNet's three archives are needed")
    for name in ARCHIVES:
        _check_archive(dataset_dir / name)
    _devkit_members(dataset_dir / DEVKIT_ARCHIVE)
    shutil.rmtree(dataset_dir / STAGING, ignore_errors=True)  # an interrupted unpacking's, before space is measured
    for split in ("train", "val"):
        if (dataset_dir / split).exists():  # one of them only: half a dataset unpacked by hand
            raise UserError(f"{dataset_dir / split} already exists beside the archives: move it away to unpack them")
    need = sum((dataset_dir / name).stat().st_size for name in (TRAIN_ARCHIVE, VAL_ARCHIVE))
    free = shutil.disk_usage(dataset_dir).free
    if free < need:
        raise UserError(
            f"unpacking ImageNet's archives needs {need / 1e9:,.1f} GB free in {dataset_dir} (the images' size); "
            f"{free / 1e9:,.1f} GB are free"
        )
    logger.info(
        "unpacking ImageNet's archives in %s, once (%.1f GB of images; afterwards the two image archives can be "
        "deleted, the devkit stays: it labels val/)", dataset_dir, need / 1e9,
    )
    staging = dataset_dir / STAGING
    (staging / "train").mkdir(parents=True)
    (staging / "val").mkdir()
    try:
        _unpack(dataset_dir / VAL_ARCHIVE, staging / "val", "val images")  # the smaller one first: a bad download fails fast
        _unpack_train(dataset_dir / TRAIN_ARCHIVE, staging / "train")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never half a dataset, nor 140 GB of it left behind
        raise
    for split in ("train", "val"):
        os.replace(staging / split, dataset_dir / split)
    staging.rmdir()
    (dataset_dir / PREPARED_MARKER).write_text("unpacked from " + ", ".join(ARCHIVES) + "\n")
    return True


def _unpack(archive_path: Path, target: Path, what: str, fileobj: Optional[io.BufferedIOBase] = None) -> int:
    """Extracts the regular files of a tar archive flat into `target` (tar's 'data' filter: no links or
    paths outside it); returns how many."""
    count = 0
    try:
        with tarfile.open(archive_path if fileobj is None else None, mode="r:*" if fileobj is None else "r|*", fileobj=fileobj) as archive:
            for member in tqdm(archive, desc=what, unit="file", disable=fileobj is not None, leave=False):
                if member.isfile() and is_image(member.name):
                    member.name = Path(member.name).name
                    archive.extract(member, target, filter="data")
                    count += 1
    except (tarfile.TarError, EOFError) as error:
        raise UserError(f"{archive_path} cannot be unpacked ({_reason(error)}); download it again") from None
    return count


def _unpack_train(archive_path: Path, target: Path) -> None:
    """The training archive holds one tar per class (n01440764.tar, ...): each is streamed into
    train/<wnid>/ without being written to disk first."""
    try:
        with tarfile.open(archive_path) as outer:
            members = [member for member in outer.getmembers() if member.isfile() and member.name.endswith(".tar")]
            if not members:
                raise UserError(f"{archive_path} holds no per-class .tar archives: not ImageNet's training archive")
            wnids = [Path(member.name).stem for member in members]
            odd = [wnid for wnid in wnids if not WNID.fullmatch(wnid)]
            if odd or len(set(wnids)) != len(wnids):
                raise UserError(f"{archive_path} holds {odd[0] + '.tar' if odd else 'a class twice'}: not ImageNet's training archive")
            for member, wnid in tqdm(list(zip(members, wnids)), desc="train classes", unit="class"):
                (target / wnid).mkdir()
                _unpack(archive_path, target / wnid, wnid, fileobj=outer.extractfile(member))
    except (tarfile.TarError, EOFError) as error:
        raise UserError(f"{archive_path} cannot be unpacked ({_reason(error)}); download it again") from None


def class_labels(layout: DataLayout, classes: Sequence[str]) -> List[Tuple[str, int]]:
    """(file name, class index) of every flat validation image, in the order class folders would give:
    by class, then file name. A label outside the training classes is one line."""
    class_to_idx = {name: index for index, name in enumerate(classes)}
    labels = flat_val_labels(layout)
    unknown = sorted({wnid for wnid in labels.values() if wnid not in class_to_idx})
    if unknown:
        raise UserError(
            f"{layout.labels_file} labels validation images with {len(unknown)} classes that {layout.train_dir} has "
            f"no folder for (e.g. {unknown[0]})"
        )
    return sorted(((name, class_to_idx[wnid]) for name, wnid in labels.items()), key=lambda item: (item[1], item[0]))
