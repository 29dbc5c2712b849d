"""Open every page of a built site (scripts/docs.sh) in headless Chromium and report what a reader would find broken.

    python scripts/check_docs.py [SITE_DIR]       # default _docs/; exits 1 and lists the problems if there are any

Chromium is driven over the Chrome DevTools Protocol on a pipe (`--remote-debugging-pipe`: commands on its fd 3,
replies on fd 4, each a JSON message ended by a NUL byte), so nothing beyond Debian's `chromium` is needed. Each page is
loaded from its file, MathJax is waited for, then the page is asked for:
- console errors, uncaught exceptions and failed loads (Chromium's log at level error);
- formulas left as text: `$...$`, `$$`, `\\(` or `\\[` outside code, scripts and MathJax's own output; formulas
  MathJax found but did not typeset, or typeset as an error (a TeX syntax error, an undefined macro); no typeset
  formula at all on a page listed as having math;
- images that did not load (`naturalWidth` 0);
- links to a local file or page that does not exist or lies outside the site, or to an anchor the page lacks.
External (http, https) links are collected, never fetched.
"""
import json
import os
import re
import select
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PAGE_TIMEOUT_S = 60

# Resolves once MathJax 2 has typeset the page: its start-up (typesetting included) runs on the Hub's queue, so a step
# queued now runs after it. At once when the page loads no MathJax.
WAIT_FOR_MATHJAX = """new Promise(resolve => {
  if (!window.MathJax || !window.MathJax.Hub) { resolve("no MathJax"); return; }
  MathJax.Hub.Queue(() => resolve("typeset"));
})"""

# What the page shows, gathered in the page.
INSPECT_PAGE = r"""(() => {
  const notText = "script, style, pre, code, textarea, .MathJax_Preview, .mjx-chtml, .MJXc-display, .MathJax_CHTML";
  // TeX errors as MathJax 2 shows them: a syntax error (noErrors), an undefined macro in red (noUndefined)
  const texError = '.mjx-noError, .MJX_Assistive_MathML merror, .MJX_Assistive_MathML mtext[mathcolor="red"]';
  const rawMath = /\$[^$\s](?:[^$]*[^$\s])?\$|\$\$|\\\(|\\\[/;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node; (node = walker.nextNode());) {
    if (!node.parentElement.closest(notText) && rawMath.test(node.textContent)) raw.push(node.textContent.trim());
  }
  return {
    rawMath: raw.map(text => text.slice(0, 100)),
    formulas: document.querySelectorAll('script[type^="math/tex"]').length,
    typeset: document.querySelectorAll(".MathJax_CHTML").length,
    mathErrors: [...document.querySelectorAll('script[type^="math/tex"]')]
      .filter(tex => (document.getElementById(tex.id + "-Frame") || document.body).querySelector(texError))
      .map(tex => tex.textContent.slice(0, 100))
      .concat([...document.querySelectorAll(".MathJax_Error")].map(e => e.textContent.slice(0, 100))),
    brokenImages: [...document.images].filter(img => img.naturalWidth === 0)
                                      .map(img => (img.getAttribute("src") || "").slice(0, 100)),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    anchors: [...document.querySelectorAll("[id], a[name]")].map(e => e.id || e.getAttribute("name")),
  };
})()"""


@dataclass
class Report:
    "What the check found over the whole site."
    pages: list = field(default_factory=list)          # site-relative paths of the pages opened
    problems: list = field(default_factory=list)       # "page: what is wrong"
    external_links: set = field(default_factory=set)   # http(s) addresses, not fetched
    typeset: dict = field(default_factory=dict)        # page -> number of formulas MathJax typeset


def pages_with_math(nbs_dir):
    "The pages (`03_wkv.html`) whose notebook has `$...$` or `$$...$$` in a markdown cell, outside code."
    pages = set()
    for path in Path(nbs_dir).glob("*.ipynb"):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        prose = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        prose = re.sub(r"```.*?```|`[^`]*`", "", prose, flags=re.S)
        if re.search(r"\$[^$\s](?:[^$]*[^$\s])?\$|\$\$", prose): pages.add(path.stem + ".html")
    return pages


def find_chromium():
    "The Chromium (or Chrome) executable on PATH, or None."
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class Chromium:
    "A headless Chromium and one tab, spoken to with the DevTools protocol over a pipe."

    def __init__(self, executable):
        self.profile = tempfile.mkdtemp(prefix="check_docs_chromium_")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        args = [executable, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={self.profile}", "about:blank"]
        self.log = os.path.join(self.profile, "chromium.log")       # its stdout and stderr, quoted if it fails
        output = [(os.POSIX_SPAWN_OPEN, fd, self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for fd in (1, 2)]
        actions = [(os.POSIX_SPAWN_DUP2, to_browser_r, 3), (os.POSIX_SPAWN_DUP2, from_browser_w, 4), *output]
        self.pid = os.posix_spawn(executable, args, os.environ, file_actions=actions)
        os.close(to_browser_r), os.close(from_browser_w)
        self.buffer, self.events, self.next_id = b"", [], 0
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable", session=self.session)
        except BaseException:
            self.close()
            raise

    def call(self, method, session=None, timeout=PAGE_TIMEOUT_S, **params):
        "Send one command and return its result; events that arrive meanwhile are kept in self.events."
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session: message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply: raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for_event(self, method, timeout=PAGE_TIMEOUT_S):
        "Wait for (and consume) the first event named `method`."
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method: return self.events.pop(i)
            self.events.append(self._receive(deadline))

    def evaluate(self, expression, timeout=PAGE_TIMEOUT_S):
        "The value of a JavaScript expression in the tab (awaited when it is a promise)."
        result = self.call("Runtime.evaluate", session=self.session, timeout=timeout, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result: raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url):
        "Load url in the tab and wait for its load event (events of the page before are dropped)."
        self.events.clear()
        self.call("Page.navigate", session=self.session, url=url)
        self.wait_for_event("Page.loadEventFired")

    def errors(self):
        "Console errors, uncaught exceptions and failed loads among the events received so far."
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                words = (str(arg.get("value", arg.get("description", ""))) for arg in params["args"])
                found.append("console: " + " ".join(words))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log: {entry['text']} {entry.get('url', '')}".strip())
        return found

    def _receive(self, deadline):
        "The next message from the browser."
        while b"\0" not in self.buffer:
            if not select.select([self.from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk: raise RuntimeError(f"Chromium closed its DevTools pipe; its output ends:\n{self.log_tail()}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def log_tail(self, lines=20):
        with open(self.log, errors="replace") as log: return "".join(log.readlines()[-lines:])

    def close(self):
        try: os.write(self.to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError: pass
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG)[0]: break
            time.sleep(0.1)
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.to_browser), os.close(self.from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()


def inspect_page(browser, page_file):
    "Open one page; returns (errors logged, what INSPECT_PAGE gathered)."
    browser.open(page_file.resolve().as_uri())
    browser.evaluate(WAIT_FOR_MATHJAX)
    return browser.errors(), browser.evaluate(INSPECT_PAGE)


def page_problems(name, errors, seen, has_math):
    "The problems of one page, from what it logged and showed."
    problems = [f"{name}: {e}" for e in errors]
    problems += [f"{name}: formula left as text: {text!r}" for text in seen["rawMath"]]
    problems += [f"{name}: TeX error in {text!r}" for text in seen["mathErrors"]]
    problems += [f"{name}: image did not load: {src!r}" for src in seen["brokenImages"]]
    if seen["formulas"] > seen["typeset"]:
        problems.append(f"{name}: {seen['formulas'] - seen['typeset']} of {seen['formulas']} formulas not typeset")
    if has_math and seen["typeset"] == 0:
        problems.append(f"{name}: its notebook has math but the page shows no typeset formula")
    return problems


def link_problems(name, links, site, anchors):
    "Links to local files that do not exist or lie outside the site, and anchors missing from their page."
    problems, external = [], set()
    for link in links:
        url = urlparse(link)
        if url.scheme in ("http", "https"):
            external.add(link)
            continue
        if url.scheme != "file":
            if url.scheme not in ("mailto", "data", "about", "javascript"): problems.append(f"{name}: odd link {link}")
            continue
        target = Path(unquote(url.path))
        if not target.is_relative_to(site): problems.append(f"{name}: link outside the site: {link}")
        elif not target.exists(): problems.append(f"{name}: broken link: {target.relative_to(site)}")
        elif url.fragment and target.suffix == ".html":
            page_anchors = anchors.get(target.relative_to(site).as_posix())
            if page_anchors is not None and not {url.fragment, unquote(url.fragment)} & page_anchors:
                problems.append(f"{name}: no anchor #{url.fragment} in {target.relative_to(site)}")
    return problems, external


def check_site(site_dir, math_pages=(), executable=None):
    """Open every .html file under site_dir; math_pages names the pages (site-relative, e.g. "03_wkv.html") that
    must show typeset math. Returns a Report."""
    site, report = Path(site_dir).resolve(), Report()
    executable = executable or find_chromium()
    if executable is None: raise FileNotFoundError(f"no Chromium found on PATH (looked for {', '.join(BROWSERS)})")
    gathered = {}
    with Chromium(executable) as browser:
        for page_file in sorted(site.rglob("*.html")):
            name = page_file.relative_to(site).as_posix()
            if name.startswith("mathjax/"): continue
            errors, seen = inspect_page(browser, page_file)
            gathered[name] = seen
            report.pages.append(name)
            report.typeset[name] = seen["typeset"]
            report.problems += page_problems(name, errors, seen, name in math_pages)
    anchors = {name: set(seen["anchors"]) for name, seen in gathered.items()}
    for name, seen in gathered.items():
        problems, external = link_problems(name, seen["links"], site, anchors)
        report.problems += problems
        report.external_links |= external
    return report


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[1]
    site_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else repo / "_docs"
    result = check_site(site_dir, pages_with_math(repo / "nbs"))
    print(f"{len(result.pages)} pages opened, {sum(result.typeset.values())} formulas typeset, "
          f"{len(result.external_links)} external links (not fetched), {len(result.problems)} problems")
    print("\n".join(result.problems))
    sys.exit(1 if result.problems else 0)
