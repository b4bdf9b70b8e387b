"""`sail report`: the page's structure and numbers (fast), and (slow) a real headless Chromium loading it."""

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from sail import sweep as sw
from sail.cli import main
from sail.core.errors import SailError
from sail.data import open_dataset
from sail.report import confusion, report
from sail.train.align_heads import AlignConfig, align
from synthetic import paired_stores


class Page(HTMLParser):
    """Collects images, links, scripts, headings and table cells."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.h2, self.cells = [], [], 0, [], []
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "img":
            self.images.append(a)
        if tag in ("a", "link") and "href" in a:
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data)
        if self._tag in ("td", "th"):
            self.cells.append(data)

    def handle_endtag(self, tag):
        self._tag = None


def _parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text())
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    img, txt = paired_stores(tmp, n=300, latent=8, image_dim=24, text_dim=16)
    run = tmp / "run"
    align(AlignConfig(image=str(img), text=str(txt), out=str(run), head="linear", out_dim=8, batch=128, steps=4,
                      optimizer="adamw", lr=1e-3, val_fraction=0.2, eval_every=2, progress=False))
    ds = open_dataset("sample-val")
    (run / "eval").mkdir()
    (run / "eval" / "retrieval.json").write_text(json.dumps({"text_to_image_R@1": 12.5, "images": 240}))
    labels = [0, 0, 1, 2, 2, 2]
    top5 = [[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [1, 0, 2, 3, 4], [2, 0, 1, 3, 4], [0, 2, 1, 3, 4], [2, 1, 0, 3, 4]]
    (run / "eval" / "predictions.json").write_text(json.dumps({
        "zeroshot": {"class_names": ["red circle", "red cross", "blue square"], "labels": labels, "top5": top5,
                     "images": ds.images[:6], "unseen": ["red cross"]},
        "retrieval": {"queries": ["a <b>red</b> circle", "a blue square"], "truth": [0, 1], "images": ds.images[:6],
                      "top5": [[0, 1, 2, 3, 4], [2, 3, 1, 0, 5]]}}))
    return run


def test_run_page_is_self_contained_and_shows_the_numbers(run):
    path = report(run)
    assert path == run / "report.html"
    page = _parse(path)
    assert page.scripts == 0 and page.links == []
    assert {"Final training metrics", "Training curves", "Evaluation: retrieval", "Zero-shot confusion matrix",
            "Retrieval examples", "Encoders", "Settings"} <= set(page.h2)
    for img in page.images:  # every image inlined and a valid PNG
        assert img["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    assert len(page.images) == 1 + 5 + 5  # curves + two rows of top-5 thumbnails
    hits = [img for img in page.images if img.get("class") == "hit"]
    assert [h["title"] for h in hits] == ["image 0", "image 1"]  # the true image of each query
    text = path.read_text()
    assert "a &lt;b&gt;red&lt;/b&gt; circle" in text and "<b>red</b>" not in text  # captions escaped
    assert "12.50" in page.cells and "240" in page.cells
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['loss']:.2f}" in page.cells
    assert "2 blue square" in page.cells and "1 red cross (unseen)" in page.cells


def test_confusion_counts():
    labels = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 0, 2]
    assert confusion(labels, pred, 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_confusion_table_cells_match(run):
    page = _parse(report(run, run / "r2.html"))
    i = page.cells.index("0 red circle")
    assert page.cells[i + 1:i + 4] == ["1", "1", "0"]   # row "red circle": predicted 0 once, 1 once
    i = page.cells.index("2 blue square")
    assert page.cells[i + 1:i + 4] == ["1", "0", "2"]


def test_sweep_page_and_errors(run, tmp_path, capsys):
    img, txt = paired_stores(tmp_path, n=300, latent=8, image_dim=24, text_dim=16)
    sw.sweep(sw.SweepConfig(out=str(tmp_path / "sw"), grid={"lr": [1e-3, 1e-2]},
                            fixed=dict(image=str(img), text=str(txt), head="linear", out_dim=8, batch=128, steps=3,
                                       optimizer="adamw", val_fraction=0.2), progress=False))
    assert main(["report", str(tmp_path / "sw")]) == 0
    page = _parse(tmp_path / "sw" / "report.html")
    assert {"Leaderboard", "Comparison", "Fixed settings", "Run lr-0.001", "Run lr-0.01"} <= set(page.h2)
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images) and len(page.images) == 3
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SailError, match="neither a sail run"):
        report(tmp_path / "empty")


@pytest.mark.slow
def test_page_renders_in_headless_chromium(run, tmp_path):
    """Chromium (Debian package `chromium`) loads the page: every <img> decodes, the console stays clean."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    path = report(run, tmp_path / "page.html")
    # a tiny script appended to a copy of the page reports whether each image decoded (naturalWidth > 0)
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
                   "document.body.setAttribute('data-images', imgs.length); "
                   "document.body.setAttribute('data-broken', imgs.filter(i => !i.complete || i.naturalWidth === 0).length);"
                   " });</script></body>"))
    log = tmp_path / "chrome.log"
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180)
    log.write_text(out.stderr)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'data-images="11"' in out.stdout and 'data-broken="0"' in out.stdout
    console = [ln for ln in out.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
    # the unmodified page too: no console output at all (no scripts, nothing fails to load)
    plain = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                            "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=180)
    assert plain.returncode == 0 and "Retrieval examples" in plain.stdout
    assert [ln for ln in plain.stderr.splitlines() if "CONSOLE" in ln or "Failed to load" in ln] == []
