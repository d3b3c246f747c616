"""influence/explorer/page.py and `top_influences.py --html`: the pages list the same top-k as the CSV, every link and
image resolves to a file inside the folder, thumbnails are made once and reused, bad input gives the CSV
path's one line with nothing written; and in a real headless Chromium, on the demo's images: every image
loads, the console stays clean, the filters and paging change what is shown, links reach the query
pages, from file:// and from a static server; names holding markup are shown as text. The browser test
saves the README's screenshots."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from browser import broken_images, chromium, console_errors
from conftest import REPO_ROOT, tiny_counts, write_image_folder
from safetensors.torch import save_file

import analyze
import top_influences
from influence.data import demo
from influence.explorer import page as explorer
from influence.results import naming

# A class folder and file names no page may treat as markup: a tag with a script handler, both quotes, &.
HOSTILE = "x<img src=y onerror=window.pwned=1>\"&'"
# The README's screenshots of the demo's explorer: written into figure/ only when asked for
# (`UPDATE_SCREENSHOTS=1 python -m pytest tests/test_explorer.py`), else beside the test's other files, so
# that running the suite leaves the repository as it was.
SCREENSHOT_NAMES = {"index": "explorer_index.png", "query": "explorer_query.png"}
DEMO_TOP_K = 5


def _screenshots(tmp_path: Path) -> dict:
    folder = REPO_ROOT / "figure" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    return {page: folder / name for page, name in SCREENSHOT_NAMES.items()}


@pytest.fixture(scope="module")
def demo_explorer(resnet50_checkpoint, tmp_path_factory):
    """The demo's folder (4 classes, 20 training images, 4 queries) scored by analyze.py with a saved
    random-init ResNet-50 (identity strategy, pairwise and self-influence: seconds, not the demo's minutes),
    and its explorer written by the real command line."""
    root = tmp_path_factory.mktemp("explorer")
    dataset_dir = demo.make_demo_dataset(root / "demo")
    output_dir = root / "results"
    common = [
        "--dataset_dir", str(dataset_dir), "--checkpoint", str(resnet50_checkpoint), "--factor_strategy", "identity",
        "--train_batch_size", "5", "--num_workers", "0", "--output_dir", str(output_dir), "--analysis_name", "demo",
        "--resize_size", "64", "--crop_size", "64",  # the explorer shows the files, not what the model saw: small is enough
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches on a shared 2-core machine: one thread is several times faster
    try:
        pairwise = analyze.main([*common, "--query_batch_size", "4", "--num_queries", "4"])["identity"]
        analyze.main([*common, "--self_influence"])
    finally:
        torch.set_num_threads(threads)
    command = [
        sys.executable, str(REPO_ROOT / "top_influences.py"), "--dataset_dir", str(dataset_dir), "--output_dir",
        str(output_dir), "--analysis_name", "demo", "--factor_strategy", "identity", "--top_k", str(DEMO_TOP_K),
        "--num_figures", "0", "--html",
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    index = naming.explorer_index(pairwise.parent)
    assert f"open {index}" in completed.stdout
    return {"dataset_dir": dataset_dir, "output_dir": output_dir, "pairwise": pairwise, "index": index,
            "summary": json.loads(naming.top_influences_tables(pairwise.parent, False)[1].read_text())}


def _hostile_folder(root: Path, queries_per_class: int = 30) -> dict:
    """Two classes, one named HOSTILE, 3 training images each and 60 queries; random scores (no record)."""
    dataset_dir = write_image_folder(root / "data", tiny_counts(classes=("n01", HOSTILE), val=queries_per_class))
    scores_dir = root / "results" / "scores_ekfac"
    scores_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({naming.SCORES_KEY: torch.randn(2 * queries_per_class, 6, generator=generator)}, str(scores_dir / naming.PAIRWISE_SCORES_FILE))
    self_dir = scores_dir.parent / "scores_ekfac_self"
    self_dir.mkdir()
    save_file({naming.SCORES_KEY: torch.rand(6, generator=generator)}, str(self_dir / naming.SELF_SCORES_FILE))
    argv = ["--dataset_dir", str(dataset_dir), "--scores", str(scores_dir), "--top_k", "3", "--num_figures", "0",
            "--no_prediction", "--html", "--thumbnail_workers", "2"]
    return {"dataset_dir": dataset_dir, "scores_dir": scores_dir, "argv": argv, "index": naming.explorer_index(scores_dir)}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    found = _hostile_folder(tmp_path_factory.mktemp("hostile"))
    top_influences.main(found["argv"])
    return found


# ------------------------------------------------------------------------------------ without a browser


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("href", "src") and value]


def test_every_link_and_image_resolves_inside_the_folder(demo_explorer):
    folder = demo_explorer["index"].parent
    pages = sorted(folder.rglob("*.html"))
    assert len(pages) == 1 + 4 + 1  # index, one page per query, self-influence
    for page in pages:
        parser = _Links()
        parser.feed(page.read_text())
        local = [target for target in parser.targets if not target.startswith("data:")]
        assert local, page
        for target in local:
            assert not re.match(r"[a-z]+:|/", target), f"{page.name}: {target} is not relative"
            resolved = (page.parent / target).resolve()
            assert resolved.is_file() and folder.resolve() in resolved.parents, f"{page.name}: {target}"
    # index.js builds these two paths for every query it shows
    for query in range(4):
        assert (folder / "thumbs" / "query" / f"{query}.jpg").is_file() and (folder / "queries" / f"{query}.html").is_file()


def test_query_pages_show_the_csv_top_k_with_labels_and_predictions(demo_explorer):
    folder = demo_explorer["index"].parent
    for entry in demo_explorer["summary"]["queries"]:
        page = (folder / "queries" / f"{entry['query_index']}.html").read_text()
        assert f'<span class="label">{entry["label"]}</span>' in page and entry["prediction"] in page
        for kind in ("helpful", "harmful"):
            section = page.split(f'id="{kind}"')[1].split("</div>\n")[0]
            shown = [int(index) for index in re.findall(r"train #(\d+)", section)]
            assert shown == [item["train_index"] for item in entry[kind]] and len(shown) == DEMO_TOP_K
    assert demo_explorer["summary"]["explorer"] == str(demo_explorer["index"])


def test_thumbnails_are_made_once_per_image_and_reused(tmp_path, capsys):
    found = _hostile_folder(tmp_path, queries_per_class=2)
    top_influences.main(found["argv"])
    folder = found["index"].parent
    thumbs = sorted((folder / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == 4 + 6  # 4 queries, and the 6 training images once each, though every query shows them
    assert "10 thumbnails made, 0 reused" in capsys.readouterr().out
    stamps = {path: path.stat().st_mtime_ns for path in thumbs}
    changed = found["dataset_dir"] / "train" / "n01" / "n01_000.JPEG"  # training image 0
    changed.write_bytes((found["dataset_dir"] / "val" / "n01" / "n01_000.JPEG").read_bytes())  # another picture
    top_influences.main(found["argv"])
    assert "1 thumbnails made, 9 reused" in capsys.readouterr().out
    remade = [path for path in thumbs if path.stat().st_mtime_ns != stamps[path]]
    assert remade == [folder / "thumbs" / "train" / "0.jpg"]
    assert sorted(path.name for path in folder.parent.iterdir() if path.name.startswith(".explorer")) == []


def test_embedded_json_cannot_close_its_script_element():
    text = explorer.script_json({"label": "</script><script>alert(1)</script>&"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"label": "</script><script>alert(1)</script>&"}


def _error_line(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        top_influences.main(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_gives_the_csv_paths_line_and_writes_nothing(demo_explorer, tmp_path, capsys):
    renamed = shutil.copytree(demo_explorer["dataset_dir"], tmp_path / "renamed")
    victim = next((renamed / "train").rglob("*.JPEG"))
    victim.rename(victim.with_name("zz_" + victim.name))
    out = tmp_path / "out"
    out.mkdir()
    base = ["--output_dir", str(demo_explorer["output_dir"]), "--analysis_name", "demo", "--factor_strategy", "identity",
            "--results_dir", str(out), "--no_prediction"]
    for dataset_dir, message in ((renamed, "train_files_sha256"), (tmp_path / "missing", "missing")):
        csv_line = _error_line(["--dataset_dir", str(dataset_dir), *base], capsys)
        html_line = _error_line(["--dataset_dir", str(dataset_dir), *base, "--html"], capsys)
        assert html_line == csv_line and message in csv_line and str(dataset_dir) in csv_line
        assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--demo", "--self", "--html"], "drop --self"),
        (["--demo", "--thumbnail_workers", "2"], "add --html"),
    ],
)
def test_impossible_html_flag_combinations(argv, message, capsys):
    assert message in _error_line(argv, capsys)


# ----------------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def _select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def _shown(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#queries figure")


def _load_clean(driver, url: str) -> None:
    driver.get(url)
    assert broken_images(driver) == [], url
    assert console_errors(driver) == [], url


def test_the_demos_explorer_in_chromium(demo_explorer, browser, tmp_path):
    from selenium.webdriver.common.by import By

    screenshots = _screenshots(tmp_path)

    index, summary = demo_explorer["index"], demo_explorer["summary"]
    _load_clean(browser, index.as_uri())
    assert len(_shown(browser)) == 4 and len(browser.find_elements(By.TAG_NAME, "img")) == 4
    assert browser.save_screenshot(str(screenshots["index"]))

    first = summary["queries"][1]
    _select(browser, "class", str(sorted({q["label"] for q in summary["queries"]}).index(first["label"])))
    assert [card.get_attribute("data-label") for card in _shown(browser)] == [first["label"]]
    _select(browser, "class", "")
    wrong = [q["query_index"] for q in summary["queries"] if not q["correct"]]
    _select(browser, "correct", "wrong")
    assert sorted(int(card.get_attribute("data-query")) for card in _shown(browser)) == wrong
    _select(browser, "correct", "")
    _select(browser, "sort", "helpful")
    strongest = sorted(summary["queries"], key=lambda q: -q["helpful"][0]["score"])
    assert [int(card.get_attribute("data-query")) for card in _shown(browser)] == [q["query_index"] for q in strongest]
    assert console_errors(browser) == []

    _shown(browser)[0].find_element(By.TAG_NAME, "a").click()
    query = strongest[0]["query_index"]
    assert browser.current_url == (index.parent / "queries" / f"{query}.html").as_uri()
    assert broken_images(browser) == [] and console_errors(browser) == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "#helpful img")) == DEMO_TOP_K
    assert len(browser.find_elements(By.CSS_SELECTOR, "#harmful img")) == DEMO_TOP_K
    browser.set_window_size(1280, 1120)  # the whole page: the query, then both rows
    assert browser.save_screenshot(str(screenshots["query"]))
    following = browser.find_elements(By.ID, "next") or browser.find_elements(By.ID, "previous")
    following[0].click()
    assert re.search(r"/queries/\d+\.html$", browser.current_url) and not browser.current_url.endswith(f"/{query}.html")
    browser.find_element(By.LINK_TEXT, "self-influence").click()
    assert broken_images(browser) == [] and console_errors(browser) == []
    cards = browser.find_elements(By.CSS_SELECTOR, "#ranked figure")
    assert len(cards) == 20  # every training image of the demo
    for card in cards:  # marked exactly where the prediction's class is not the label
        label = card.find_element(By.CLASS_NAME, "label").text
        predicted = card.find_element(By.CLASS_NAME, "prediction").text.rsplit(" (", 1)[0]
        assert ("disagree" in card.get_attribute("class")) == (predicted != label)


def test_the_explorer_from_a_static_server_and_its_paging(hostile, browser):
    from selenium.webdriver.common.by import By

    folder = hostile["index"].parent
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _load_clean(browser, f"http://127.0.0.1:{server.server_address[1]}/index.html")
        status = browser.find_element(By.ID, "status")
        assert len(_shown(browser)) == explorer.QUERIES_PER_PAGE and status.text == "60 of 60 queries, page 1 of 2"
        browser.find_element(By.ID, "next-page").click()
        assert len(_shown(browser)) == 60 - explorer.QUERIES_PER_PAGE and status.text.endswith("page 2 of 2")
        assert broken_images(browser) == [] and console_errors(browser) == []
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass


def test_names_with_markup_are_shown_as_text(hostile, browser):
    from selenium.webdriver.common.by import By

    index = hostile["index"]
    _load_clean(browser, index.as_uri())
    options = [option.text for option in browser.find_elements(By.CSS_SELECTOR, "#class option")]
    assert options == ["all", "n01", HOSTILE]
    _select(browser, "class", "1")
    labels = {card.find_element(By.CLASS_NAME, "label").text for card in _shown(browser)}
    assert labels == {HOSTILE}
    query = int(_shown(browser)[0].get_attribute("data-query"))
    pages = [(index.parent / "queries" / f"{query}.html").as_uri(), (index.parent / explorer.SELF_PAGE).as_uri()]
    for url in [index.as_uri(), *pages]:
        _load_clean(browser, url)
        assert browser.execute_script("return window.pwned === undefined && document.querySelectorAll('img[src=\"y\"]').length === 0")
        shown = {element.text for element in browser.find_elements(By.CLASS_NAME, "label")}
        assert HOSTILE in shown or url == index.as_uri()
    _load_clean(browser, pages[0])
    assert browser.title == f"query {query}: {HOSTILE}"
    assert any(HOSTILE in element.text for element in browser.find_elements(By.CLASS_NAME, "file"))


def test_benchmark_measures_a_first_run_and_a_reusing_rerun(tmp_path):
    """benchmarks/explorer_benchmark.py at toy size: the real command line twice, every thumbnail made
    once (queries and the distinct training images their lists name), all reused by the rerun."""
    from benchmarks import explorer_benchmark

    result = explorer_benchmark.main(["--num_queries", "4", "--num_train", "12", "--num_classes", "2", "--thumbnail_workers", "1",
                                      "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "bench.json")])
    assert "(16 thumbnails made, 0 reused)" in result["first_run"]["summary"]  # top-10 of 12: every training image
    assert "(0 thumbnails made, 16 reused)" in result["rerun"]["summary"]
    assert result["first_run"]["peak_rss_bytes"] > 0 and not (tmp_path / "work").exists()
    assert json.loads((tmp_path / "bench.json").read_text())["num_train"] == 12
