"""The figures of top_influences.py, saved as PNG files: a query beside its most helpful and most harmful
training images, and the training images of highest self-influence, each shown as the model saw it
(resized and centre-cropped) with its label, score and the model's prediction. Axes are placed by hand, so
a figure's size in pixels follows from its number of cells alone."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image
from torchvision import transforms

from influence.results.top_k import HARMFUL, HELPFUL, Example

# Figure geometry, in inches at DPI: each cell is an image with its caption above and a gap beside it,
# and a title band tops the figure. Axes are placed by hand (no tight bounding box), so the PNG's size in
# pixels follows from the number of cells alone.
IMAGE_INCHES = 1.6
CAPTION_INCHES = 0.62
GAP_INCHES = 0.12
TITLE_INCHES = 0.4
DPI = 100
# Saved with an adaptive palette: a quarter of the bytes of full colour, plenty for thumbnails.
PALETTE_COLOURS = 256
SELF_GRID_COLUMNS = 5
LABEL_WIDTH = 28  # characters of a label shown under an image


def figure_size_pixels(rows: int, columns: int) -> Tuple[int, int]:
    """(width, height) of a figure of rows x columns cells."""
    width = columns * (IMAGE_INCHES + GAP_INCHES)
    height = rows * (IMAGE_INCHES + CAPTION_INCHES) + TITLE_INCHES
    return round(width * DPI), round(height * DPI)


def _shown(text: str) -> str:
    return text if len(text) <= LABEL_WIDTH else text[: LABEL_WIDTH - 1] + "…"


def draw_grid(path: Path, cells: List[List[Optional[Tuple[str, str]]]], title: str, view: transforms.Compose) -> None:
    """Saves a grid of images: `cells[row][column]` is (image file, caption) or None for an empty cell.
    Images are shown as the model saw them: `view` resizes and centre-crops them (Preprocessing.view)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    rows, columns = len(cells), max(len(row) for row in cells)
    width, height = (size / DPI for size in figure_size_pixels(rows, columns))
    figure = plt.figure(figsize=(width, height), dpi=DPI)
    for row, row_cells in enumerate(cells):
        for column, cell in enumerate(row_cells):
            if cell is None:
                continue
            left = column * (IMAGE_INCHES + GAP_INCHES) + GAP_INCHES / 2
            bottom = height - TITLE_INCHES - (row + 1) * (IMAGE_INCHES + CAPTION_INCHES)
            axes = figure.add_axes((left / width, bottom / height, IMAGE_INCHES / width, IMAGE_INCHES / height))
            axes.set_xticks([])
            axes.set_yticks([])
            image_path, caption = cell
            with Image.open(image_path) as image:
                axes.imshow(view(image.convert("RGB")))
            axes.set_title(caption, fontsize=6.5)
    figure.suptitle(title, fontsize=8.5, y=1 - 0.1 / height, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    plt.close(figure)
    with Image.open(buffer) as rendered:
        rendered.convert("RGB").quantize(colors=PALETTE_COLOURS, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def _caption(heading: str, example: Example, score: float) -> str:
    return f"{heading}: train #{example.index}\n{_shown(example.label)}\nscore {score:.4g}"


def draw_query_figure(
    path: Path, query: Example, prediction: Optional[str], ranked: Dict[str, List[Tuple[Example, float]]], scores_label: str,
    view: transforms.Compose,
) -> None:
    """Row 1: the query, then its most helpful training images; row 2: its most harmful ones."""
    query_caption = f"query {query.index}\nlabel {_shown(query.label)}"
    query_caption += f"\npred. {_shown(prediction)}" if prediction else ""
    cells: List[List[Optional[Tuple[str, str]]]] = [
        [(query.path, query_caption)] + [(e.path, _caption(f"helpful {r}", e, s)) for r, (e, s) in enumerate(ranked[HELPFUL], 1)],
        [None] + [(e.path, _caption(f"harmful {r}", e, s)) for r, (e, s) in enumerate(ranked[HARMFUL], 1)],
    ]
    no_negative = all(score >= 0 for _, score in ranked[HARMFUL])
    draw_grid(path, cells, f"query {query.index} ({Path(query.path).name}), `{scores_label}` scores: most helpful "
              f"(top row) and most harmful (bottom row{': no score is negative, so these helped least' if no_negative else ''})", view)


def draw_self_figure(
    path: Path, ranked: List[Tuple[Example, float]], predictions: Dict[int, str], scores_label: str, view: transforms.Compose
) -> None:
    cells: List[List[Optional[Tuple[str, str]]]] = []
    for rank, (example, score) in enumerate(ranked, 1):
        if (rank - 1) % SELF_GRID_COLUMNS == 0:
            cells.append([])
        caption = _caption(f"rank {rank}", example, score)
        if example.index in predictions:
            caption += f"\npred. {_shown(predictions[example.index])}"
        cells[-1].append((example.path, caption))
    draw_grid(path, cells, f"highest self-influence (`{scores_label}`): candidates for mislabelled or atypical images", view)
