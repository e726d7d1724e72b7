"""HTML pages as a reader sees them: the main content as Markdown-like text.

`parse_html` picks the page's main-content container (Read the Docs, MkDocs Material, Docusaurus,
Sphinx, `<main>`, `<article>`), drops navigation, headers, footers, sidebars, scripts and permalink
marks, writes h1..h6 as `#` headings and code blocks as fenced code, so that `lorag.documents`
chunks the page by its sections and never takes a `# comment` in code for a heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser


# Where a page keeps its main content, most specific first; the first selector that matches wins,
# and within it the first matching element. (tag or "", attribute or "", value or ""), and a
# "class" value matches one class of the element's class list.
_MAIN_CONTENT = (
    ("", "itemprop", "articleBody"),  # Read the Docs theme (Sphinx and MkDocs), schema.org markup
    ("article", "class", "md-content__inner"),  # MkDocs Material
    ("div", "class", "theme-doc-markdown"),  # Docusaurus
    ("", "role", "main"),  # Sphinx basic/alabaster/classic `div.body`, Furo and PyData `article`, MkDocs
    ("main", "", ""),
    ("article", "", ""),
    ("div", "class", "body"),  # Sphinx themes without ARIA roles
    ("div", "class", "rst-content"),
    ("div", "class", "md-content"),
    ("div", "class", "document"),  # Sphinx: body and sidebar together (the sidebar is dropped below)
)
# Never a reader's text, wherever they are. `nav` also drops docutils' local table of contents
# (it repeats the headings); `a.headerlink` and the like are permalink marks, `md-source-file`
# is MkDocs Material's "last update" line, `linenos` the line numbers Pygments puts beside code.
# A Sphinx toctree stays: inside the main content it is the page's own list of what it covers.
_DROP_TAGS = {"head", "script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "button",
              "form", "select", "textarea", "search", "nav", "footer"}
_DROP_ROLES = {"navigation", "search", "banner", "contentinfo"}
_DROP_CLASSES = {"headerlink", "hash-link", "anchorjs-link", "sphinxsidebar", "md-sidebar", "md-header", "md-footer",
                 "md-tabs", "md-source-file", "linenos", "linenodiv"}
# Containers that also hold the site's chrome around the page (a header with the site's name and
# links, prev/next bars): inside them, as in a page with no container, link bars are dropped.
_BROAD = {("div", "class", "document")}
# A link bar: a block of at most this much text (non-space characters), with at least two links
# holding this share of it ("Home | Contents | Index", "« previous | up | next »"). Links in a list
# do not count: a list of links is a page's own table of contents (a site's menus are in <nav>).
_BAR_MAX_CHARS, _BAR_MIN_LINKS, _BAR_LINK_SHARE = 300, 2, 0.7
_LISTS = {"ul", "ol", "dl"}
_LIST_ITEMS = {"li", "dt", "dd"}
# What separates a page's own title from the site's in <title> ("Fixtures — pytest documentation").
_TITLE_SEP = re.compile(r"\s+(?:—|–|-|\||·|»|::)\s+")
# Page chrome when no main-content container is found. Inside a container they are kept: there a
# `header` holds the article's own title (Docusaurus) and an `aside` holds footnotes, topics and
# sidebars (docutils >= 0.18).
_PAGE_CHROME = {"header", "aside"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
# A text line that Markdown would read as a heading or a code fence: escaped in HTML text, where
# only heading elements are headings and only <pre> is code.
_MARKUP_LINE = re.compile(r"#{1,6}(?:[ \t]|$)|```|~~~")


@dataclass(slots=True)  # slots: a page can hold millions of elements
class _Element:
    tag: str
    attrs: dict[str, str]
    children: list  # of _Element and str, in document order

    def matches(self, tag: str, attr: str, value: str) -> bool:
        if tag and self.tag != tag:
            return False
        if attr == "class":
            return value in self.attrs.get("class", "").split()
        return not attr or self.attrs.get(attr) == value


def parse_html(html: str) -> tuple[str, str]:
    """(Markdown-like text of the page's main content, title: `<title>` without the site's name
    (`_page_title`), else the first h1, else ""). In a container that holds the site's chrome too
    (`_BROAD`), and in a page without a container, link bars are dropped (`_link_bars`)."""
    tree = _HtmlTree()
    tree.feed(html)
    tree.close()
    title_el = next((e for e in _elements(tree.root, _everything) if e.tag == "title"), None)
    title = " ".join("".join(_texts(title_el)).split()) if title_el else ""
    # A container is looked for outside the chrome only (an <article> in a sidebar is not the page).
    content = list(_elements(tree.root, lambda e: not _is_chrome(e)))
    selector, container = next(((sel, e) for sel in _MAIN_CONTENT for e in content if e.matches(*sel)), (None, None))
    writer = _TextWriter()
    if container is not None:
        bars = _link_bars(container, lambda e: not _is_chrome(e)) if selector in _BROAD else set()
        writer.write(container, lambda e: not _is_chrome(e) and id(e) not in bars)
    text = writer.result()
    if not text.strip():  # no container, or an empty one (a page its scripts fill in)
        writer = _TextWriter()
        bars = _link_bars(tree.root, lambda e: not _is_chrome(e) and e.tag not in _PAGE_CHROME)
        writer.write(tree.root, lambda e: not _is_chrome(e) and e.tag not in _PAGE_CHROME and id(e) not in bars)
        text = writer.result()
    return text, _page_title(title, writer.first_h1)


def _page_title(title: str, h1: str) -> str:
    """The page's own title: `title` without the site's name after it when its first part is the
    page's first heading ("Fixtures — pytest documentation" with h1 "Fixtures": "Fixtures"); no
    <title>: the first heading."""
    head = _TITLE_SEP.split(title, maxsplit=1)[0]
    return head if h1 and head != title and head.casefold() == h1.casefold() else (title or h1)


def _link_bars(root: _Element, keep) -> set[int]:
    """The ids of the link bars under `root` (site headers, breadcrumbs, prev/next bars: see
    `_BAR_MAX_CHARS`), outermost only, among the elements `keep` admits; linear in the tree."""
    order = list(_elements(root, keep))  # parents before their children
    stats: dict[int, tuple[int, int, int]] = {}  # id -> (non-space characters, of them in links, links)
    for el in reversed(order):  # children before their parents
        chars = link_chars = links = 0
        for child in el.children:
            if isinstance(child, str):
                chars += len(child) - sum(map(child.count, " \t\n\r\f\v"))
            elif id(child) in stats:
                c, lc, n = stats[id(child)]
                if child.tag in _LISTS:  # a list's links are a table of contents, not a bar
                    lc = n = 0
                chars, link_chars, links = chars + c, link_chars + lc, links + n
        if el.tag == "a":
            link_chars, links = chars, links + 1
        stats[id(el)] = (chars, link_chars, links)
    bars: set[int] = set()
    for el in _elements(root, lambda e: keep(e) and id(e) not in bars):  # a bar's insides are not visited
        chars, link_chars, links = stats.get(id(el), (0, 0, 0))
        if (el is not root and el.tag not in _LISTS | _LIST_ITEMS and 0 < chars <= _BAR_MAX_CHARS and links >= _BAR_MIN_LINKS
                and link_chars >= _BAR_LINK_SHARE * chars):
            bars.add(id(el))
    return bars


def _is_chrome(el: _Element) -> bool:
    return (el.tag in _DROP_TAGS or el.attrs.get("role") in _DROP_ROLES
            or not _DROP_CLASSES.isdisjoint(el.attrs.get("class", "").split()))


class _HtmlTree(HTMLParser):
    """The element tree of an HTML page, built as a browser would for well-formed pages.

    An end tag closes the nearest open element of its name and those opened inside it; an end tag
    with no open element of its name is ignored. Unclosed <p> and <li> simply nest, which keeps the
    text in document order (every walk over the tree is iterative, so depth is no limit). A comment,
    declaration or tag still open at the end of the page runs to its end, as in HTML5.

    Building the tree takes time linear in the page: the open elements are counted by tag, so an end
    tag with none open costs nothing, and the search for one that is open stops at it after passing
    only elements it closes (without the count, "<p>" * n + "</b>" * n would take n * n steps).
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self.root = _Element("#document", {}, [])
        self.open = [self.root]
        self.open_tags: dict[str, int] = {}  # open elements of each tag

    def handle_starttag(self, tag, attrs):
        el = _Element(tag, {k: v or "" for k, v in attrs}, [])
        self.open[-1].children.append(el)
        if tag not in _VOID:
            self.open.append(el)
            self.open_tags[tag] = self.open_tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.open_tags.get(tag):
            return
        i = len(self.open) - 1
        while self.open[i].tag != tag:
            i -= 1
        for el in self.open[i:]:
            self.open_tags[el.tag] -= 1
        del self.open[i:]

    def close(self):
        # `feed` stops at the first comment, declaration or tag that does not end. Python without
        # the fix of gh-135462 (2025) then reads it as text and goes on, searching the rest of the
        # page again for the end of every later one: time quadratic in the page ("<!--" * n).
        # HTML5 (and a browser) ends it at the end of the page, which is what dropping it does.
        if self.rawdata.startswith("<") and self.rawdata not in ("<", "</") and not self.cdata_elem:
            self.rawdata = ""
        super().close()

    def handle_data(self, data):
        self.open[-1].children.append(data.replace("\0", ""))  # NUL marks blocks in `_TextWriter`


def _walk(root: _Element, keep):
    """("open", element), ("text", str) and ("close", element) events of `root`'s subtree in
    document order, leaving out the subtrees of elements for which `keep(element)` is false."""
    yield "open", root
    stack = [(root, iter(root.children))]
    while stack:
        el, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            yield "close", el
        elif isinstance(child, str):
            yield "text", child
        elif keep(child):
            yield "open", child
            stack.append((child, iter(child.children)))


def _everything(el: _Element) -> bool:
    return True


def _elements(root: _Element, keep):
    return (item for kind, item in _walk(root, keep) if kind == "open")


def _texts(root: _Element):
    return (item for kind, item in _walk(root, _everything) if kind == "text")


class _TextWriter:
    """Markdown-like text of an element tree: h1..h6 as "#" headings, <pre> as fenced code, other
    blocks as paragraphs.

    Whitespace collapses as a browser would, except in code, which keeps its lines and indentation.
    Headings and code blocks are written as NUL-delimited placeholders and put back after the
    whitespace clean-up, so that clean-up never touches them and no text line can pose as one.
    """

    _PARAGRAPH = {"p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote", "table", "ul",
                  "ol", "dl", "figure", "figcaption", "form", "hr", "address", "details", "summary"}
    _LINE = {"br", "li", "tr", "dt", "dd"}

    def __init__(self):
        self.parts: list[str] = []
        self.blocks: list[str] = []
        self.heading: list[str] | None = None
        self.code: list[str] | None = None
        self.pre_depth = 0
        self.first_h1 = ""

    def write(self, root: _Element, keep) -> None:
        for kind, item in _walk(root, keep):
            if kind == "text":
                self.text(item)
            elif kind == "open":
                self.open(item.tag)
            else:
                self.close(item.tag)

    def open(self, tag: str) -> None:
        if tag == "pre":
            self.pre_depth += 1
            self.code = [] if self.code is None else self.code
        if self.code is not None:  # markup inside code is highlighting: only line breaks matter
            if tag == "br":
                self.code.append("\n")
            return
        if self.heading is not None:
            return
        if re.fullmatch(r"h[1-6]", tag):
            self.heading = []
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag in self._PARAGRAPH or tag in self._LINE:
            self.parts.append("\n\n" if tag in self._PARAGRAPH else "\n")

    def close(self, tag: str) -> None:
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
            if not self.pre_depth:
                self._block(_fenced(self.code))
                self.code = None
        elif self.code is not None:
            return
        elif re.fullmatch(r"h[1-6]", tag) and self.heading is not None:
            words = _without_permalink(" ".join("".join(self.heading).replace("\u200b", "").split()))
            self.heading = None
            if words:
                self._block(f"{'#' * int(tag[1])} {words}")
                self.first_h1 = self.first_h1 or (words if tag == "h1" else "")
        elif tag in self._PARAGRAPH and self.heading is None:  # a line break only opens (<br/> is one break)
            self.parts.append("\n\n")

    def text(self, data: str) -> None:
        if self.code is not None:
            self.code.append(data)
        elif self.heading is not None:
            self.heading.append(data)
        else:
            self.parts.append(re.sub(r"\s+", " ", data))

    def _block(self, block: str) -> None:
        if block:
            self.parts.append(f"\n\n\0{len(self.blocks)}\0\n\n")
            self.blocks.append(block)

    def result(self) -> str:
        lines = []
        for line in "".join(self.parts).split("\n"):
            line = line.strip()
            lines.append("\\" + line if _MARKUP_LINE.match(line) else line)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        return re.sub(r"\0(\d+)\0", lambda m: self.blocks[int(m[1])], text)


def _without_permalink(words: str) -> str:
    """A heading's words (single-spaced) without the permalink marks a page puts after them: a run
    of "¶" or "🔗" marks, or " #" (string operations, in time linear in the heading)."""
    if words.endswith(("¶", "🔗")):
        return words.rstrip(" ¶🔗")
    bare = words.rstrip("#")
    return bare.rstrip(" ") if bare != words and bare.endswith(" ") else words


def _fenced(parts: list[str] | None) -> str:
    """A <pre> block's text as fenced code: lines and indentation kept, blank edges and trailing
    spaces dropped, fenced with more backticks than any run inside it ("" for an empty block)."""
    code = "".join(parts or []).replace("\r\n", "\n").replace("\r", "\n")
    code = "\n".join(line.rstrip() for line in code.split("\n")).strip("\n")
    if not code.strip():
        return ""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", code)), default=0))
    return f"{fence}\n{code}\n{fence}"
