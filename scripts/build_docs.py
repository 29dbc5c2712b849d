"""The notebooks as a static HTML site, built with nbconvert from their saved outputs (nothing is re-executed).

    python scripts/build_docs.py [OUT_DIR]        # default _docs/; scripts/docs.sh calls this

One page per notebook in nbs/ (`index.ipynb` becomes `index.html`, with a table of contents), in notebook order,
each with the list of all pages and previous/next links. nbdev's directives are applied the way its own docs apply
them: cells flagged `#| hide` are left out, `#| echo: false` drops a cell's input and `#| output: false` its outputs,
and the directive lines themselves are stripped from the code shown. Markdown links are rewritten for the site: a
notebook (`03_wkv.ipynb#Chunks`) becomes its page (`03_wkv.html#Chunks`), any other file of the repository is copied
in under `source/` (text files as highlighted HTML with line anchors, others as they are), a picture is embedded in
the page as a data URI (as nbconvert embeds the pictures of cell outputs). Every page links the modules its notebook
exports (`source/visualrwkv/wkv.py.html`). Math is typeset by MathJax 2.7, served from a copy inside the site
(Debian's libjs-mathjax), so the pages read offline.
"""
import base64
import configparser
import html
import mimetypes
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import jinja2
import nbformat
from nbconvert import HTMLExporter
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_for_filename
from pygments.util import ClassNotFound

REPO = Path(__file__).resolve().parents[1]
MATHJAX_DIR = Path("/usr/share/javascript/mathjax")      # Debian's libjs-mathjax (MathJax 2.7)
MATHJAX_CONFIG = "TeX-AMS_CHTML-full,Safe"                # nbconvert's default configuration, CommonHTML output
MATHJAX_PARTS = ["MathJax.js", "config/TeX-AMS_CHTML-full.js", "config/Safe.js", "extensions", "jax/input/TeX",
                 "jax/output/CommonHTML", "jax/element", "localization", "fonts/HTML-CSS/TeX/woff"]

DIRECTIVE = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")         # a directive line: `#| export`, `#| echo: false`
EXPORT_FLAGS = {"export", "exports", "exporti"}
CURRENT = ' class="docs-current"'
LINK = re.compile(r'(<(?:a|img)\b[^>]*?\b(?:href|src)=")([^"]*)(")')

CSS = """
body.jp-Notebook { display: block; margin: 0; padding: 0; }
.docs-sidebar { position: fixed; top: 0; bottom: 0; left: 0; width: 15rem; overflow-y: auto; padding: 1rem;
  box-sizing: border-box; border-right: 1px solid #ddd; background: #fafafa; font: 14px/1.4 sans-serif; }
.docs-sidebar ol { padding-left: 0; list-style: none; }
.docs-sidebar li { margin: 0.3rem 0; }
.docs-sidebar .docs-current { font-weight: bold; }
main.docs-main { margin-left: 15rem; padding: 1rem 2rem; max-width: 70rem; }
.docs-sidebar a, .docs-exports a, .docs-pager a, .docs-toc a { color: #0550ae; text-decoration: none; }
.docs-exports, .docs-pager { font: 14px sans-serif; margin: 0.5rem 0 1rem; }
.docs-pager { display: flex; justify-content: space-between; border-top: 1px solid #ddd; padding-top: 0.8rem; }
.docs-toc li { margin: 0.2rem 0; }
@media (max-width: 50rem) { .docs-sidebar { position: static; width: auto; } main.docs-main { margin-left: 0; } }
"""

# lab's page, minus what it would fetch from a CDN (require.js, mermaid) and minus the sanitizer run over the code
# Pygments highlighted (the costliest step of the build), plus the site's navigation
TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block input %}
<div class="jp-CodeMirrorEditor jp-Editor jp-InputArea-editor" data-type="inline">
<div class="cm-editor cm-s-jupyter">
{{ cell.source | highlight_code(metadata=cell.metadata) }}
</div>
</div>
{%- endblock input %}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}<style type="text/css">{{ resources.docs.css }}</style>{% endblock extra_css %}
{%- block body_header -%}
<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
{{ resources.docs.sidebar }}
<main class="docs-main">
{{ resources.docs.exports }}
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.docs.toc }}
{{ resources.docs.pager }}
</main>
</body>
{% endblock body_footer %}
"""


@dataclass
class Page:
    "One notebook and the page it becomes."
    notebook: Path
    nb: nbformat.NotebookNode
    title: str
    modules: list = field(default_factory=list)   # module names it exports to, e.g. ["wkv"]

    @property
    def html_name(self): return self.notebook.stem + ".html"


def directives(cell):
    "The leading `#|` lines of a code cell, as strings (`'export'`, `'echo: false'`), and the source after them."
    lines = cell.source.splitlines()
    flags = []
    while lines and DIRECTIVE.match(lines[0]):
        flags.append(DIRECTIVE.match(lines.pop(0)).group(1))
    return flags, "\n".join(lines).strip("\n")


def exported_modules(nb):
    "The modules a notebook exports to: its `#| default_exp`, or the target named by `#| export <module>`."
    default, targets = None, []
    for cell in nb.cells:
        if cell.cell_type != "code": continue
        for flag in directives(cell)[0]:
            name, *args = flag.split() or [""]
            if name == "default_exp" and args: default = args[0]
            elif name in EXPORT_FLAGS: targets.append(args[0] if args else default)
    return list(dict.fromkeys(t for t in targets if t))


def title_of(nb, fallback):
    "The text of the notebook's first `# heading`, markdown code marks removed."
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if match: return match.group(1).replace("`", "").strip()
    return fallback


def read_pages(nbs_dir):
    "Every notebook in nbs_dir, `index` first, then in file-name order (the notebooks' numbers)."
    paths = sorted(Path(nbs_dir).glob("*.ipynb"), key=lambda p: (p.stem != "index", p.name))
    pages = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        pages.append(Page(path, nb, title_of(nb, path.stem), exported_modules(nb)))
    return pages


def apply_directives(nb):
    "The notebook as its page shows it: `#| hide` cells gone, directive lines stripped, directive-only cells gone."
    shown = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            shown.append(cell)
            continue
        flags, source = directives(cell)
        flags = {f.replace(" ", "") for f in flags}
        if "hide" in flags: continue
        cell.source = "" if flags & {"echo:false", "hide_input"} else source
        if flags & {"output:false", "hide_output"}: cell.outputs = []
        if cell.source or cell.outputs: shown.append(cell)
    nb.cells = shown
    return nb


class Site:
    "Where things go in the output folder, and the copies of repository files that links point at."

    def __init__(self, out_dir, nbs_dir, lib_dir, pages):
        self.out_dir, self.nbs_dir, self.lib_dir = Path(out_dir), Path(nbs_dir).resolve(), Path(lib_dir).resolve()
        self.root = self.nbs_dir.parent                              # the repository: what links may point into
        self.page_of_notebook = {p.notebook.resolve(): p.html_name for p in pages}
        self.exporters = {}                                          # module file -> the pages exporting to it
        for page in pages:
            for module in page.modules: self.exporters.setdefault(self.module_file(module), []).append(page)

    def module_file(self, module):
        return self.lib_dir / (module.replace(".", "/") + ".py")

    def module_link(self, module):
        "The site path of an exported module's source page (a path that leads nowhere if the module file is missing)."
        module_file = self.module_file(module)
        if module_file.is_file(): return self.copy_of(module_file)
        return f"source/{module_file.relative_to(self.root).as_posix()}.html"

    def copy_of(self, repo_file):
        """The site path (relative to out_dir) of a repository file, copied there on first use: text files as
        highlighted HTML, other files as they are."""
        rel = repo_file.relative_to(self.root).as_posix()
        lexer = _lexer_for(repo_file)
        target = f"source/{rel}.html" if lexer else f"source/{rel}"
        dest = self.out_dir / target
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if lexer: dest.write_text(self.source_page(repo_file, target, lexer), encoding="utf-8")
            else: shutil.copyfile(repo_file, dest)
        return target

    def source_page(self, repo_file, target, lexer):
        "A repository file as highlighted HTML, line anchors `#L12`, with links back to the site and to its notebooks."
        up = os.path.relpath(".", os.path.dirname(target))
        notebooks = self.exporters.get(repo_file, [])
        back = [f'<a href="{up}/index.html">Home</a>'] + [
            f'exported from <a href="{up}/{p.html_name}">{html.escape(p.title)}</a>' for p in notebooks]
        formatter = HtmlFormatter(linenos="table", lineanchors="L", anchorlinenos=True)
        rel = html.escape(repo_file.relative_to(self.root).as_posix())
        code = highlight(repo_file.read_text(encoding="utf-8"), lexer, formatter)
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{rel}</title>\n'
                f'<style>body {{ font-family: sans-serif; margin: 1rem 2rem; }} '
                f'{formatter.get_style_defs(".highlight")}</style>\n</head>\n<body>\n'
                f'<p><code>{rel}</code> &middot; {" &middot; ".join(back)}</p>\n{code}</body>\n</html>\n')

    def rewrite(self, url, picture=False):
        """A link or picture address of a notebook as the site needs it: a notebook's page, a copy of a repository
        file, a picture embedded as a data URI; left as it is when it leads nowhere."""
        if not url or re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", url, re.I): return url
        path, _, fragment = url.partition("#")
        target = (self.nbs_dir / unquote(path)).resolve()
        if not target.is_file() or not target.is_relative_to(self.root): return url
        if picture: return _data_uri(target)
        site_path = self.page_of_notebook.get(target) or self.copy_of(target)
        return site_path + ("#" + fragment if fragment else "")

    def rewrite_links(self, page_html):
        "Every `<a href>` and `<img src>` of a rendered page, rewritten by `rewrite`."
        def one(match):
            url = html.unescape(match.group(2))
            return match.group(1) + html.escape(self.rewrite(url, match.group(1).startswith("<img"))) + match.group(3)
        return LINK.sub(one, page_html)


def _data_uri(path):
    "A picture as a data URI, so that the page carries it."
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _lexer_for(path):
    try: return get_lexer_for_filename(path.name)
    except ClassNotFound: return None


def sidebar_html(pages, current):
    items = "".join(f'<li{CURRENT if p is current else ""}><a href="{p.html_name}">{html.escape(p.title)}</a></li>\n'
                    for p in pages)
    return f'<nav class="docs-sidebar" aria-label="pages">\n<ol>\n{items}</ol>\n</nav>'


def pager_html(pages, current):
    i = pages.index(current)
    before, after = (pages[i - 1] if i else None), (pages[i + 1] if i + 1 < len(pages) else None)
    previous = f'<a rel="prev" href="{before.html_name}">&larr; {html.escape(before.title)}</a>' if before else ""
    following = f'<a rel="next" href="{after.html_name}">{html.escape(after.title)} &rarr;</a>' if after else ""
    return f'<nav class="docs-pager" aria-label="pager"><span>{previous}</span><span>{following}</span></nav>'


def exports_html(site, page):
    if not page.modules: return ""
    paths = [site.module_file(m).relative_to(site.root).as_posix() for m in page.modules]   # visualrwkv/wkv.py
    links = ", ".join(f'<a href="{site.module_link(m)}"><code>{html.escape(path)}</code></a>'
                      for m, path in zip(page.modules, paths))
    return f'<p class="docs-exports">Exports to {links}</p>'


def toc_html(pages):
    items = "".join(f'<li><a href="{p.html_name}">{html.escape(p.title)}</a> <small>({p.notebook.name})</small></li>\n'
                    for p in pages if p.notebook.stem != "index")
    return f'<section class="docs-toc"><h2 id="contents">Contents</h2>\n<ol>\n{items}</ol>\n</section>'


def make_exporter():
    """lab's HTML exporter with the site's template. Pictures are embedded by `Site.rewrite`, not by nbconvert's
    embed_images, which parses each raw HTML block of a markdown cell alone and so closes an opening `<details>`
    before the text it should fold."""
    return HTMLExporter(template_file="docs.html.j2", extra_loaders=[jinja2.DictLoader({"docs.html.j2": TEMPLATE})],
                        mathjax_url=f"mathjax/MathJax.js?config={MATHJAX_CONFIG}", embed_images=False,
                        exclude_input_prompt=True, exclude_output_prompt=True)


def render_page(exporter, site, pages, page):
    "One notebook's page, as HTML text."
    nb = apply_directives(page.nb)
    docs = {"css": CSS, "sidebar": sidebar_html(pages, page), "pager": pager_html(pages, page),
            "exports": exports_html(site, page), "toc": toc_html(pages) if page.notebook.stem == "index" else ""}
    resources = {"metadata": {"path": str(site.nbs_dir), "name": page.title}, "docs": docs}
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    return site.rewrite_links(body)


def copy_mathjax(mathjax_dir, out_dir):
    "The parts of MathJax 2.7 that the CommonHTML TeX configuration loads (symlinks followed: Debian links its fonts)."
    if not (Path(mathjax_dir) / "MathJax.js").is_file():
        sys.exit(f"MathJax 2.7 not found in {mathjax_dir}: install it with `apt-get install libjs-mathjax`")
    for part in MATHJAX_PARTS:
        source, dest = Path(mathjax_dir) / part, Path(out_dir) / "mathjax" / part
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir(): shutil.copytree(source, dest, dirs_exist_ok=True)
        else: shutil.copyfile(source, dest)


def build_site(out_dir, nbs_dir=REPO / "nbs", lib_dir=None, mathjax_dir=MATHJAX_DIR):
    "Render every notebook of nbs_dir into out_dir (emptied first); returns the pages in site order."
    out_dir = Path(out_dir)
    if lib_dir is None: lib_dir = _lib_dir(Path(nbs_dir).resolve().parent)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "mathjax" / "MathJax.js").is_file():
            sys.exit(f"{out_dir} is not empty and holds no earlier site: not replacing it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_mathjax(mathjax_dir, out_dir)
    pages = read_pages(nbs_dir)
    site, exporter = Site(out_dir, nbs_dir, lib_dir, pages), make_exporter()
    for page in pages:
        (out_dir / page.html_name).write_text(render_page(exporter, site, pages, page), encoding="utf-8")
    return pages


def _lib_dir(repo):
    "settings.ini's lib_path (nbdev's package folder)."
    settings = configparser.ConfigParser()
    settings.read(repo / "settings.ini")
    return repo / settings["DEFAULT"].get("lib_path", "visualrwkv")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "_docs"
    built = build_site(out)
    print(f"{len(built)} pages in {out}/ (open {out}/index.html)")
