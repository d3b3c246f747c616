"""The static influence explorer that `top_influences.py --html` writes: a folder of plain HTML, CSS and a
little JavaScript (assets/) that opens from `file://` or any static server, with every path
relative so the folder can be copied or zipped. `index.html` shows every query as a thumbnail with its
label and the model's prediction, sorted, filtered and paged in the browser; each query has a page of its
own with its most helpful and most harmful training images; with self-influence scores, `self.html` ranks
training images by them and marks where label and prediction disagree. Thumbnails (and a copy of each
full image) are made once per image, in parallel, and reused by a rerun while the source file is
unchanged. The folder is built under a temporary name and renamed when complete, so a failed build
leaves the previous explorer, or nothing, in place. Every name from the user's files is escaped."""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from influence.results import naming
from influence.runtime.cli import UserError

logger = logging.getLogger("explorer")

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ASSETS = ("explorer.css", "index.js")
THUMBNAIL_PIXELS = 128  # the longer side of a thumbnail
THUMBNAIL_QUALITY = 85  # JPEG quality of thumbnails
QUERIES_PER_PAGE = 48  # queries shown at once on index.html (paged in the browser)
QUERY_PAGES = "queries"
THUMBS, IMAGES = "thumbs", "images"
MANIFEST = "manifest.json"  # which source file (path, size, mtime) each thumbnail was made from
SELF_PAGE = "self.html"
QUERY, TRAIN = "query", "train"


@dataclass(frozen=True)
class Picture:
    """One image the explorer shows: where it comes from and where its thumbnail and full copy go."""

    kind: str  # QUERY or TRAIN
    index: int
    source: str

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.index}"

    @property
    def thumb(self) -> str:
        return f"{THUMBS}/{self.kind}/{self.index}.jpg"

    @property
    def full(self) -> str:
        suffix = Path(self.source).suffix
        return f"{IMAGES}/{self.kind}/{self.index}{suffix if suffix[1:].isalnum() else ''}"


def script_json(value: Any) -> str:
    """JSON to embed in a <script> element: `<`, `>` and `&` become \\u escapes, so no string in it
    (a class named `</script>...`) can end the element or start markup."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _source_stamp(path: str) -> List[Any]:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (no extra space), else a copy: for the previous explorer's
    own files, which nothing else shares."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _make_picture(picture: Picture, staging: Path) -> None:
    try:
        with Image.open(picture.source) as image:
            image.draft("RGB", (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))  # JPEGs decode at a reduced scale: much faster
            thumbnail = image.convert("RGB")
        thumbnail.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        thumbnail.save(staging / picture.thumb, format="JPEG", quality=THUMBNAIL_QUALITY)
        # A copy, never a hard link: editing the explorer's image must not edit the dataset's.
        shutil.copyfile(picture.source, staging / picture.full)
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"cannot make a thumbnail of {picture.source}: {error}") from None


def make_pictures(pictures: Sequence[Picture], staging: Path, previous: Optional[Path], workers: int) -> Dict[str, int]:
    """Thumbnails and full copies of `pictures` under `staging`, reusing those of the `previous` explorer
    whose source file is unchanged; writes the manifest. Returns how many were made and reused."""
    for kind in (QUERY, TRAIN):
        (staging / THUMBS / kind).mkdir(parents=True, exist_ok=True)
        (staging / IMAGES / kind).mkdir(parents=True, exist_ok=True)
    old: Dict[str, Any] = {}
    if previous is not None and (previous / THUMBS / MANIFEST).is_file():
        try:
            recorded = json.loads((previous / THUMBS / MANIFEST).read_text())
            old = recorded["images"] if recorded.get("thumbnail_pixels") == THUMBNAIL_PIXELS else {}
        except (ValueError, KeyError):
            old = {}
    manifest: Dict[str, Any] = {}
    to_make: List[Picture] = []
    for picture in pictures:
        stamp = _source_stamp(picture.source)
        manifest[picture.key] = stamp
        reusable = previous is not None and old.get(picture.key) == stamp
        if reusable and (previous / picture.thumb).is_file() and (previous / picture.full).is_file():
            for name in (picture.thumb, picture.full):
                _link_or_copy(previous / name, staging / name)
        else:
            to_make.append(picture)
    if to_make:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while it decodes
            jobs = pool.map(lambda picture: _make_picture(picture, staging), to_make)
            for _ in tqdm(jobs, total=len(to_make), desc="thumbnails", unit="image"):
                pass
    (staging / THUMBS / MANIFEST).write_text(json.dumps({"thumbnail_pixels": THUMBNAIL_PIXELS, "images": manifest}))
    return {"made": len(to_make), "reused": len(pictures) - len(to_make)}


# ------------------------------------------------------------------------------------------- pages


def _page(title: str, body: str, depth: int, scripts: Iterable[str] = ()) -> str:
    """A whole page; `depth` folders below the explorer's root (for the relative path to the CSS)."""
    up = "../" * depth
    tags = "".join(f'<script src="{up}{name}"></script>' for name in scripts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<link rel="icon" href="data:,"><link rel="stylesheet" href="{up}explorer.css"></head>\n'
        f"<body>\n{body}\n{tags}</body></html>\n"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _verdict(correct: Optional[bool]) -> str:
    if correct is None:
        return ""
    return '<span class="right">right</span>' if correct else '<span class="wrong">wrong</span>'


def _card(picture: Picture, up: str, lines: Sequence[str], extra_class: str = "") -> str:
    """A thumbnail linking to the full image, with lines of (already escaped) text under it."""
    text = "".join(f"<div>{line}</div>" for line in lines)
    return (
        f'<figure class="card{extra_class}"><a href="{up}{_e(picture.full)}"><img src="{up}{_e(picture.thumb)}" '
        f'alt="{_e(Path(picture.source).name)}"></a><figcaption>{text}</figcaption></figure>'
    )


def _train_card(item: Dict[str, Any], heading: str, up: str) -> str:
    picture = Picture(TRAIN, item["train_index"], item["train_path"])
    lines = [
        f'<b>{_e(heading)} {item["rank"]}</b> · score <span class="score">{item["score"]:.4g}</span>',
        f'<span class="label">{_e(item["label"])}</span>',
        f'train #{item["train_index"]} <span class="file">{_e(Path(item["train_path"]).name)}</span>',
    ]
    if "prediction" in item:
        lines.append(f'pred. <span class="prediction">{_e(item["prediction"])}</span> {_verdict(item.get("correct"))}')
    disagree = item.get("correct") is False
    return _card(picture, up, lines, " disagree" if disagree else "")


def query_page_name(query_index: int) -> str:
    return f"{QUERY_PAGES}/{query_index}.html"


def query_page(entry: Dict[str, Any], previous: Optional[int], following: Optional[int], title: str, has_self: bool) -> str:
    index = entry["query_index"]
    picture = Picture(QUERY, index, entry["query_path"])
    nav = ['<a href="../index.html" id="to-index">all queries</a>']
    nav.append(f'<a href="{previous}.html" id="previous">&larr; query {previous}</a>' if previous is not None else "")
    nav.append(f'<a href="{following}.html" id="next">query {following} &rarr;</a>' if following is not None else "")
    if has_self:
        nav.append(f'<a href="../{SELF_PAGE}">self-influence</a>')
    prediction = ""
    if "prediction" in entry:
        prediction = f'<p>prediction: <span class="prediction">{_e(entry["prediction"])}</span> {_verdict(entry.get("correct"))}</p>'
    sections = []
    least = "no score is negative: these helped least" if all(item["score"] >= 0 for item in entry["harmful"]) else "lowered it most"
    for kind, heading, note in (("helpful", "helpful", "raised the query's measurement most"), ("harmful", "harmful", least)):
        cards = "".join(_train_card(item, heading, "../") for item in entry[kind])
        sections.append(f'<h2>Most {heading} <small>({note})</small></h2>\n<div class="grid" id="{kind}">{cards}</div>')
    body = (
        f'<nav>{" ".join(nav)}</nav>\n<h1>Query {index}: <span class="file">{_e(Path(entry["query_path"]).name)}</span></h1>\n'
        f'<div class="query"><a href="../{_e(picture.full)}"><img class="large" src="../{_e(picture.full)}" alt="query {index}"></a>'
        f'<div><p>label: <span class="label">{_e(entry["label"])}</span>{" (predicted)" if entry.get("label_source") == "predicted" else ""}</p>{prediction}<p class="muted">{_e(title)}</p></div></div>\n'
        + "\n".join(sections)
    )
    return _page(f"query {index}: {entry['label']}", body, depth=1)


def index_page(entries: Sequence[Dict[str, Any]], title: str, has_self: bool) -> str:
    labels = sorted({entry["label"] for entry in entries})
    data = {
        "perPage": QUERIES_PER_PAGE,
        "labels": labels,
        "queries": [
            {
                "i": entry["query_index"], "l": labels.index(entry["label"]), "p": entry.get("prediction"),
                "c": entry.get("correct"), "h": entry["helpful"][0]["score"] if entry["helpful"] else None,
                "x": entry["harmful"][0]["score"] if entry["harmful"] else None,
            }
            for entry in entries
        ],
    }
    options = "".join(f'<option value="{number}">{_e(label)}</option>' for number, label in enumerate(labels))
    has_predictions = any(entry.get("correct") is not None for entry in entries)
    self_link = f' · <a href="{SELF_PAGE}">training images by self-influence</a>' if has_self else ""
    body = f"""<h1>Influence explorer</h1>
<p class="muted">{_e(title)}: {len(entries)} queries{self_link}</p>
<form id="controls">
<label>class <select id="class"><option value="">all</option>{options}</select></label>
<label>prediction <select id="correct"{'' if has_predictions else ' disabled'}><option value="">all</option><option value="right">right</option><option value="wrong">wrong</option></select></label>
<label>top helpful score at least <input id="min-score" type="number" step="any"></label>
<label>sort <select id="sort"><option value="index">query number</option><option value="helpful">strongest helpful first</option><option value="harmful">strongest harmful first</option></select></label>
</form>
<p><button id="previous-page" type="button">&larr;</button> <span id="status"></span> <button id="next-page" type="button">&rarr;</button></p>
<div class="grid" id="queries"></div>
<script type="application/json" id="data">{script_json(data)}</script>"""
    return _page("Influence explorer", body, depth=0, scripts=["index.js"])


def self_page(ranked: Sequence[Dict[str, Any]], title: str, num_train: int) -> str:
    judged = [item for item in ranked if item.get("correct") is not None]
    disagree = sum(1 for item in judged if not item["correct"])
    summary = (
        f"{disagree} of these {len(judged)} training images are predicted as another class than their label "
        "(marked): the likely mislabels." if judged else "No predictions (--no_prediction): labels only."
    )
    cards = "".join(_train_card(item, "rank", "") for item in ranked)
    body = (
        f'<nav><a href="index.html">all queries</a></nav>\n<h1>Training images by self-influence</h1>\n'
        f'<p class="muted">{_e(title)}: the {len(ranked)} highest of {num_train}. {summary}</p>\n'
        f'<div class="grid" id="ranked">{cards}</div>'
    )
    return _page("Training images by self-influence", body, depth=0)


# ------------------------------------------------------------------------------------------- build


def check_destination(results_dir: Path) -> Path:
    """The explorer folder; one line if it cannot be written (checked before any heavy work)."""
    target = naming.explorer_dir(results_dir)
    parent = target.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (target.exists() and not target.is_dir()):
        raise UserError(f"cannot write the explorer folder {target}")
    return target


def pictures_of(entries: Sequence[Dict[str, Any]], ranked: Sequence[Dict[str, Any]]) -> List[Picture]:
    """Every image shown, each once however many pages show it."""
    found: Dict[str, Picture] = {}
    for entry in entries:
        query = Picture(QUERY, entry["query_index"], entry["query_path"])
        found.setdefault(query.key, query)
    for item in [item for entry in entries for kind in ("helpful", "harmful") for item in entry[kind]] + list(ranked):
        picture = Picture(TRAIN, item["train_index"], item["train_path"])
        found.setdefault(picture.key, picture)
    return list(found.values())


def build_explorer(
    results_dir: Path, entries: Sequence[Dict[str, Any]], ranked: Optional[Sequence[Dict[str, Any]]], title: str,
    num_train: int, workers: int,
) -> Tuple[Path, Dict[str, int]]:
    """Writes the explorer under `results_dir`; returns its index page and the thumbnail counts.

    `entries` are top_influences.py's JSON entries (query_index, query_path, label, optional prediction and
    correct, helpful and harmful lists); `ranked` the highest self-influence entries, or None."""
    target = check_destination(results_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would keep a shared results folder's explorer private
    try:
        counts = make_pictures(pictures_of(entries, ranked or []), staging, target if target.is_dir() else None, workers)
        for name in ASSETS:
            shutil.copyfile(ASSETS_DIR / name, staging / name)
        (staging / QUERY_PAGES).mkdir()
        order = [entry["query_index"] for entry in entries]
        for position, entry in enumerate(entries):
            previous = order[position - 1] if position > 0 else None
            following = order[position + 1] if position + 1 < len(order) else None
            page = query_page(entry, previous, following, title, ranked is not None)
            (staging / query_page_name(entry["query_index"])).write_text(page, encoding="utf-8")
        if ranked is not None:
            (staging / SELF_PAGE).write_text(self_page(ranked, title, num_train), encoding="utf-8")
        (staging / naming.EXPLORER_INDEX).write_text(index_page(entries, title, ranked is not None), encoding="utf-8")
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / naming.EXPLORER_INDEX, counts
