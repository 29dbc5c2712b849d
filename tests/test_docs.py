"""scripts/docs.sh: the notebooks as a static site; scripts/check_docs.py opens every page in headless Chromium.

Needs Debian's chromium and libjs-mathjax. Without them the tests skip, unless VISUALRWKV_REQUIRE_BROWSER=1 (set by
.ci/run), which makes their absence a failure.
"""
import base64
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

REPO = Path(__file__).resolve().parents[1]
ONE_PIXEL_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
                                 "RU5ErkJggg==")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_docs, check_docs = load_script("build_docs"), load_script("check_docs")


def require(package, found):
    "Skip without a Debian package, or fail when VISUALRWKV_REQUIRE_BROWSER=1."
    if found: return
    why = f"{package} is not installed (apt-get install -y --no-install-recommends {package})"
    if os.environ.get("VISUALRWKV_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why}; VISUALRWKV_REQUIRE_BROWSER=1 makes that a failure")
    pytest.skip(f"{why}; set VISUALRWKV_REQUIRE_BROWSER=1 to make that a failure")


@pytest.fixture(scope="module")
def mathjax():
    "MathJax 2.7 from Debian's libjs-mathjax, which every site serves a copy of."
    require("libjs-mathjax", (build_docs.MATHJAX_DIR / "MathJax.js").is_file())


@pytest.fixture(scope="module")
def chromium(mathjax):
    "The path of Chromium, to open the pages with."
    path = check_docs.find_chromium()
    require("chromium", path)
    return path


def write_notebook(path, *cells):
    "A notebook of (cell_type, source) pairs, saved without outputs."
    nb = {"cells": [{"cell_type": kind, "id": f"{i:08x}", "metadata": {}, "source": source,
                     **({"execution_count": None, "outputs": []} if kind == "code" else {})}
                    for i, (kind, source) in enumerate(cells)],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))


@pytest.fixture
def small_repo(tmp_path):
    "A repository of three notebooks and the module the first exports, with a picture beside the notebooks."
    nbs, lib = tmp_path / "repo" / "nbs", tmp_path / "repo" / "mini"
    nbs.mkdir(parents=True), lib.mkdir()
    (nbs / "dot.png").write_bytes(ONE_PIXEL_PNG)
    (lib / "mini.py").write_text('def shown(): return "shown marker"\n')
    write_notebook(nbs / "index.ipynb", ("markdown", "# Mini site\n\nThe start."))
    write_notebook(nbs / "00_first.ipynb",
                   ("code", "#| default_exp mini"),
                   ("markdown", "# First page\n\nSee [the second](01_second.ipynb#Second-page), the formula $x^2$, "
                                "![a dot](dot.png) and [its source](../mini/mini.py)."),
                   ("code", '#| hide\nHIDDEN = "hidden marker"'),
                   ("markdown", "<details><summary>Solution</summary>\n\nThe folded answer.\n\n</details>"),
                   ("code", '#| export\ndef shown(): return "shown marker"'))
    write_notebook(nbs / "01_second.ipynb", ("markdown", "# Second page\n\n$$\\sum_{i=1}^{3} i = 6$$"))
    return nbs, lib


def test_a_small_notebook_renders_as_nbdev_shows_it(mathjax, small_repo, tmp_path):
    """Hidden cells and directive lines gone, a folded answer still folded, links to notebooks and files rewritten for
    the site, the picture embedded, the exported module linked, pages in notebook order with previous/next, contents
    on index.html."""
    nbs, lib = small_repo
    site = tmp_path / "site"
    pages = build_docs.build_site(site, nbs_dir=nbs, lib_dir=lib)
    assert [p.html_name for p in pages] == ["index.html", "00_first.html", "01_second.html"]
    first = BeautifulSoup((site / "00_first.html").read_text(), "html.parser")
    code = first.find("main").get_text()
    assert "shown marker" in code and "hidden marker" not in code and "#|" not in code and "default_exp" not in code
    assert "The folded answer." in first.find("details").get_text()
    assert first.find("a", string="the second")["href"] == "01_second.html#Second-page"
    assert first.find("a", string="its source")["href"] == "source/mini/mini.py.html"
    assert first.find("img", alt="a dot")["src"] == "data:image/png;base64," + base64.b64encode(ONE_PIXEL_PNG).decode()
    assert first.select_one(".docs-exports a")["href"] == "source/mini/mini.py.html"
    assert "shown marker" in (site / "source/mini/mini.py.html").read_text()
    assert [a["href"] for a in first.select(".docs-sidebar a")] == ["index.html", "00_first.html", "01_second.html"]
    assert first.select_one('a[rel="prev"]')["href"] == "index.html"
    assert first.select_one('a[rel="next"]')["href"] == "01_second.html"
    mathjax = first.find("script", src=lambda src: src and "MathJax.js" in src)["src"]
    assert mathjax.startswith("mathjax/MathJax.js?") and (site / "mathjax/MathJax.js").is_file()
    index = BeautifulSoup((site / "index.html").read_text(), "html.parser")
    assert [a["href"] for a in index.select(".docs-toc a")] == ["00_first.html", "01_second.html"]


def test_the_small_site_reads_clean_in_chromium(chromium, small_repo, tmp_path):
    "Every page of the small site opens without a problem, each formula typeset: one inline, one display."
    nbs, lib = small_repo
    build_docs.build_site(tmp_path / "site", nbs_dir=nbs, lib_dir=lib)
    report = check_docs.check_site(tmp_path / "site", {"00_first.html", "01_second.html"}, chromium)
    assert report.problems == []
    assert report.pages == ["00_first.html", "01_second.html", "index.html", "source/mini/mini.py.html"]
    assert report.typeset == {"00_first.html": 1, "01_second.html": 1, "index.html": 0, "source/mini/mini.py.html": 0}


def test_the_checker_reports_a_broken_page(chromium, tmp_path):
    "A page with a bad link, a missing image, an anchor-less fragment, a console error and `$x$` with no MathJax."
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "outside.html").write_text("<p>not part of the site</p>")
    (site / "broken.html").write_text(
        '<!DOCTYPE html><html><body><p>Formula $x$ as text.</p><a href="missing.html">gone</a> '
        '<a href="../outside.html">out</a> <a href="#nowhere">here</a> <img src="missing.png" alt="lost">'
        '<script>console.error("deliberate")</script></body></html>')
    problems = check_docs.check_site(site, {"broken.html"}, chromium).problems
    expected = ["broken.html: console: deliberate",
                "broken.html: formula left as text: 'Formula $x$ as text.'",
                "broken.html: image did not load: 'missing.png'",
                "broken.html: its notebook has math but the page shows no typeset formula",
                "broken.html: broken link: missing.html",
                f"broken.html: link outside the site: {(tmp_path / 'outside.html').as_uri()}",
                "broken.html: no anchor #nowhere in broken.html"]
    assert [p for p in expected if p not in problems] == []
    failed_load = [p for p in problems if p not in expected]        # Chromium's log of the missing picture
    assert len(failed_load) == 1 and failed_load[0].startswith("broken.html: log:") and "missing.png" in failed_load[0]


def test_the_checker_reports_bad_tex_a_missing_notebook_and_a_missing_picture(chromium, tmp_path):
    "A TeX syntax error and an undefined macro are typeset by MathJax as errors; what is missing stays missing."
    nbs = tmp_path / "repo" / "nbs"
    nbs.mkdir(parents=True)
    write_notebook(nbs / "index.ipynb", ("markdown", "# Bad\n\nSee $x^{$, $\\foo y$, $z$, [later](99_later.ipynb) "
                                                     "and ![gone](gone.png)."))
    build_docs.build_site(tmp_path / "site", nbs_dir=nbs, lib_dir=tmp_path / "repo" / "lib")
    report = check_docs.check_site(tmp_path / "site", {"index.html"}, chromium)
    logged = [p for p in report.problems if p.startswith("index.html: log:")]
    assert len(logged) == 1 and "gone.png" in logged[0]
    assert [p for p in report.problems if p not in logged] == [
        "index.html: TeX error in 'x^{'", r"index.html: TeX error in '\\foo y'",
        "index.html: image did not load: 'gone.png'", "index.html: broken link: 99_later.ipynb"]
    assert report.typeset == {"index.html": 3}


def test_every_page_of_the_site_reads_clean(chromium, tmp_path):
    """`bash scripts/docs.sh DIR` renders one page per notebook plus the exported modules' sources; Chromium finds no
    console error, no formula left as text or untypeset, no missing image and no broken link on any of them."""
    site = tmp_path / "site"
    start = time.monotonic()
    subprocess.run(["bash", str(REPO / "scripts" / "docs.sh"), str(site)], check=True)
    built = time.monotonic()
    report = check_docs.check_site(site, check_docs.pages_with_math(REPO / "nbs"), chromium)
    checked = time.monotonic()
    print(f"docs: built in {built - start:.1f} s, {len(report.pages)} pages checked in {checked - built:.1f} s, "
          f"{sum(report.typeset.values())} formulas typeset, {len(report.external_links)} external links (not fetched)")
    assert report.problems == [], "\n".join(report.problems)
    notebooks = {p.stem + ".html" for p in (REPO / "nbs").glob("*.ipynb")}
    assert notebooks <= set(report.pages) and any(p.startswith("source/visualrwkv/") for p in report.pages)
