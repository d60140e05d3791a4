"""Training text for the demo model, English prose read offline from two Debian packages:

1. "The Debian Administrator's Handbook", English edition (package `debian-handbook`,
   GPL-2.0+ or CC-BY-SA-3.0), from its HTML: the text of every DocBook paragraph
   (`<div class="para">`) and the section titles, in reading order (following the pages'
   rel="next" links from index.html). Program listings and screen dumps (`<pre>`), index anchors
   and navigation are dropped.
2. The Python 3.11 documentation (package `python3.11-doc`, PSF License Agreement), from the
   reStructuredText sources Sphinx ships in html/_sources: the tutorial, FAQ, HOWTOs, language
   reference, "What's New" and library chapters (files in sorted order); only unindented
   paragraphs that read as sentences are kept (no code, tables, directives or lists), with inline
   markup (:role:`x`, ``x``, *x*) reduced to its text.

The split is deterministic: the paragraphs are grouped into blocks of about 4 KB of contiguous
text, and every 20th block (starting with block 10) is held out."""

import html.parser
import os
import re
import unicodedata

HANDBOOK = "/usr/share/doc/debian-handbook/html/en-US"
BLOCK_BYTES = 4096
HELDOUT_EVERY = 20
HELDOUT_PHASE = 10


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras = []      # finished paragraphs, in order
        self.buf = []        # text of the paragraph being read
        self.depth_para = 0  # open <div class="para"> (nested ones split paragraphs)
        self.in_title = 0
        self.skip = 0        # inside <pre>, <script>, <style>
        self.stack = []      # (tag, kind) for closing
        self.next = None

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paras.append(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "link" and a.get("rel") == "next" and self.next is None:
            self.next = a.get("href")
        if tag in ("meta", "link", "img", "br", "hr", "col", "area", "input"):
            return
        cls = (a.get("class") or "").split()
        kind = None
        if tag in ("pre", "script", "style") or (tag == "ul" and "docnav" in cls):
            kind = "skip"
            self.skip += 1
        elif tag == "div" and "para" in cls:
            kind = "para"
            self._flush()
            self.depth_para += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5"):
            kind = "title"
            self._flush()
            self.in_title += 1
        self.stack.append((tag, kind))

    def handle_endtag(self, tag):
        while self.stack:
            t, kind = self.stack.pop()
            if kind == "skip":
                self.skip -= 1
            elif kind == "para":
                self._flush()
                self.depth_para -= 1
            elif kind == "title":
                self._flush()
                self.in_title -= 1
            if t == tag:
                break

    def handle_data(self, data):
        if self.skip == 0 and (self.depth_para > 0 or self.in_title > 0):
            self.buf.append(data)


def paragraphs(root=HANDBOOK):
    """All prose paragraphs of the handbook, in reading order."""
    seen, out, page = set(), [], "index.html"
    while page and page not in seen and os.path.exists(os.path.join(root, page)):
        seen.add(page)
        p = _Page()
        with open(os.path.join(root, page), encoding="utf-8") as f:
            p.feed(f.read())
        p.close()
        out.extend(unicodedata.normalize("NFC", t) for t in p.paras)
        page = p.next.split("#")[0] if p.next else None
    return out


PYDOC = "/usr/share/doc/python3.11/html/_sources"
PYDOC_DIRS = ("tutorial", "faq", "howto", "reference", "whatsnew", "library")


def _rst_inline(t):
    t = re.sub(r":[\w:.+-]+:`~?!?([^`<]*?)\s*(<[^>`]*>)?`", r"\1", t)   # :role:`text <target>`
    t = re.sub(r"``([^`]+)``", r"\1", t)
    t = re.sub(r"`([^`<]+?)\s*(<[^>`]*>)?`_{1,2}", r"\1", t)            # `link <url>`_
    t = re.sub(r"`([^`]+)`", r"\1", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"\1", t)
    t = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*", r"\1", t)
    t = re.sub(r"\s*\[#\w*\]_", "", t)
    t = t.replace("\\", "")
    t = t.replace("::", ":")
    return re.sub(r"\s+", " ", t).strip()


def _prose(t):
    if len(t) < 80 or not t[0].isupper() or t[-1] not in ".:?!)":
        return False
    letters = sum(c.isalpha() or c == " " for c in t)
    return letters >= 0.85 * len(t) and "=" not in t and ">>>" not in t and "|" not in t


def python_paragraphs(root=PYDOC):
    """Prose paragraphs of the Python documentation sources, in sorted file order."""
    out = []
    for sub in PYDOC_DIRS:
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".rst.txt")]
        for path in sorted(files):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for block in re.split(r"\n\s*\n", text):
                lines = block.split("\n")
                if not lines or any(l[:1].isspace() or not l for l in lines):
                    continue
                if any(l.startswith(("..", "*", "-", "+", "#", "=", ":", "|", "(")) for l in lines):
                    continue
                if re.match(r"^\d+\.|^[a-z]\)", lines[0]):
                    continue
                t = unicodedata.normalize("NFC", _rst_inline(" ".join(lines)))
                if _prose(t):
                    out.append(t)
    return out


def split(paras):
    """(train_blocks, heldout_blocks): lists of texts, each a run of paragraphs joined by
    blank lines."""
    blocks, cur, size = [], [], 0
    for t in paras:
        cur.append(t)
        size += len(t.encode()) + 2
        if size >= BLOCK_BYTES:
            blocks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        blocks.append("\n\n".join(cur))
    train, held = [], []
    for i, b in enumerate(blocks):
        (held if i % HELDOUT_EVERY == HELDOUT_PHASE else train).append(b)
    return train, held


if __name__ == "__main__":
    ps = paragraphs() + python_paragraphs()
    tr, he = split(ps)
    print(len(ps), "paragraphs;", sum(len(b.encode()) for b in tr), "train bytes in", len(tr),
          "blocks;", sum(len(b.encode()) for b in he), "held-out bytes in", len(he), "blocks")
    print(tr[-30][:3000])
