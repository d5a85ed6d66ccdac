"""Unlabelled segments: web documents cut into the passages M_yx will write instructions for.

The paper (section 3.1) takes English ClueWeb pages and keeps "the text that follows an HTML
header", with the text of its sub-headers. `header_segments` does that on any document that has
headers: HTML pages and MediaWiki articles. Documents without headers (C4 text, plain text files)
are cut into runs of whole paragraphs no longer than `max_chars`; their segments carry no header.
"""

from __future__ import annotations

import hashlib
import html
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from humpback_nb.infra.sources import SOURCES, fetch
from humpback_nb.method.data.filters import FILTER_KEYS, apply_filters, progress_bar
from humpback_nb.method.data.inputs import DataError, inner_name, open_input, read_input_text
from humpback_nb.method.data.seed import iter_json_records

CORPUS_KEY = "data.corpus_sources"
CORPUS_FILES = (".html", ".htm", ".jsonl", ".txt", ".xml")  # each may end in .gz, .bz2 or .xz too


@dataclass
class Block:
    """A header (level 1-6) or a paragraph (level 0) of a document."""

    level: int
    text: str


@dataclass
class Document:
    id: str
    blocks: list[Block]
    has_headers: bool


# -- HTML ----------------------------------------------------------------------------------------
class _BlockParser(HTMLParser):
    """HTML -> headers and paragraphs; script, style and other non-text elements are skipped."""

    HEADERS = {f"h{i}": i for i in range(1, 7)}
    BREAKS = {"p", "div", "li", "ul", "ol", "table", "tr", "td", "th", "br", "section", "article", "pre",
              "blockquote", "dd", "dt", "figcaption", "main", "header", "footer", "aside", "nav", "hr"}
    SKIP = {"script", "style", "noscript", "template", "head", "svg", "iframe", "object"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.tags = 0
        self._buffer: list[str] = []
        self._level = 0
        self._skip = 0

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.blocks.append(Block(self._level, text))
        self._buffer = []

    def handle_starttag(self, tag: str, attrs) -> None:
        self.tags += 1
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.HEADERS:
            self._flush()
            self._level = self.HEADERS[tag]
        elif tag in self.BREAKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.HEADERS:
            self._flush()
            self._level = 0
        elif tag in self.BREAKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_blocks(text: str, where: str = "<html>") -> list[Block]:
    """Headers and paragraphs of an HTML page, in order."""
    parser = _BlockParser()
    parser.feed(text)
    parser.close()
    if parser.tags == 0:
        raise DataError(f"{where}: does not look like HTML (no tags found)")
    return parser.blocks


# -- MediaWiki markup ----------------------------------------------------------------------------
_WIKI_HEADER = re.compile(r"^(={1,6})\s*(.+?)\s*\1\s*$")
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_NON_TEXT_LINK = re.compile(r"^(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", re.I)


def _link_text(match: re.Match) -> str:
    target = match.group(1)
    if _NON_TEXT_LINK.match(target):
        return ""
    return target.split("|")[-1]


def wiki_clean(markup: str) -> str:
    """Plain text of MediaWiki markup: templates, tables, references, files and tags removed."""
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    for pattern, replace in ((_INNER_TEMPLATE, ""), (_INNER_TABLE, ""), (_INNER_LINK, _link_text)):
        previous = None
        while previous != text:  # innermost first, until nothing nested is left
            previous, text = text, pattern.sub(replace, text)
    text = re.sub(r"\[https?://\S+\s+([^\]]+)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    return html.unescape(text)


def wiki_blocks(markup: str) -> list[Block]:
    """Headers (== Header == is level 2) and paragraphs of a MediaWiki article."""
    blocks = []
    for line in wiki_clean(markup).splitlines():
        header = _WIKI_HEADER.match(line.strip())
        if header:
            blocks.append(Block(len(header.group(1)), " ".join(header.group(2).split())))
            continue
        text = " ".join(line.lstrip("*#:; ").split())
        if text:
            blocks.append(Block(0, text))
    return blocks


def iter_mediawiki_dump(path: Path) -> Iterator[tuple[str, str]]:
    """(title, markup) for each article (namespace 0, not a redirect) of a MediaWiki XML dump (read as a stream)."""
    with open_input(path, CORPUS_KEY) as handle:
        try:
            for _, element in ET.iterparse(handle, events=("end",)):
                if element.tag.rsplit("}", 1)[-1] != "page":
                    continue
                fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
                title = fields["title"].text or ""
                text = fields["text"].text if "text" in fields else None
                is_article = fields.get("ns") is not None and (fields["ns"].text or "0") == "0"
                if is_article and text and not text.lstrip().upper().startswith("#REDIRECT"):
                    yield title, text
                element.clear()
        except ET.ParseError as err:
            raise DataError(f"{path}, line {err.position[0]}: not a valid MediaWiki XML dump ({err})") from None


# -- plain text ----------------------------------------------------------------------------------
# wiki_demo joins paragraphs with no space ("...socialism.Humans lived..."): a sentence end glued to
# a capital letter is a paragraph break there.
_GLUED_PARAGRAPHS = re.compile(r"(?<=[a-z0-9)\]\"'][.!?])(?=[A-Z])")


def text_blocks(text: str, glued: bool = False) -> list[Block]:
    """Paragraphs of plain text: lines, or (glued=True) sentence ends run into a capital."""
    parts = _GLUED_PARAGRAPHS.split(text) if glued else text.splitlines()
    return [Block(0, " ".join(part.split())) for part in parts if part.strip()]


# -- documents of a corpus source ----------------------------------------------------------------
def read_documents(source: str) -> Iterator[Document]:
    """Documents of an embedded corpus (c4_demo, wiki_demo, enwiki_sample) or of a file or folder.

    Files: .html/.htm pages, .jsonl (a `text` field per line), .txt (paragraphs separated by blank
    lines), MediaWiki dumps (.xml), each of them also compressed (.gz, .bz2, .xz). In a folder, files of
    other kinds are skipped; a file of another kind named on its own is an error.
    """
    if source == "c4_demo":
        path = fetch(source)
        for line, record in iter_json_records(path, CORPUS_KEY):
            yield Document(f"c4_demo:{line}", text_blocks(_text_of(record, path, line)), False)
    elif source == "wiki_demo":
        path = fetch(source)
        for number, line in enumerate(read_input_text(path, CORPUS_KEY).splitlines(), start=1):
            if line.strip():
                yield Document(f"wiki_demo:{number}", text_blocks(line, glued=True), False)
    elif source == "enwiki_sample":
        for title, markup in iter_mediawiki_dump(fetch(source)):
            yield Document(f"enwiki_sample:{title}", [Block(1, title), *wiki_blocks(markup)], True)
    elif source in SOURCES:
        raise DataError(f"embedded source {source!r} is not a corpus; corpora: c4_demo, wiki_demo, enwiki_sample")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from _file_documents(child)
        elif path.exists():
            if not inner_name(path).endswith(CORPUS_FILES):
                raise DataError(f"{path}: not a corpus file the kit reads (one of {', '.join(CORPUS_FILES)}, also "
                                f"as .gz, .bz2, .xz) ({CORPUS_KEY})")
            yield from _file_documents(path)
        else:
            raise DataError(f"{path}: no such corpus file or folder ({CORPUS_KEY})")


def _text_of(record: dict, path: Path, line: int) -> str:
    text = record.get("text")
    if not isinstance(text, str):
        raise DataError(f"{path}, line {line}: missing text field 'text'")
    return text


def _file_documents(path: Path) -> Iterator[Document]:
    name = inner_name(path)
    if name.endswith((".html", ".htm")):
        yield Document(str(path), html_blocks(read_input_text(path, CORPUS_KEY), str(path)), True)
    elif name.endswith(".xml"):
        for title, markup in iter_mediawiki_dump(path):
            yield Document(f"{path}:{title}", [Block(1, title), *wiki_blocks(markup)], True)
    elif name.endswith(".jsonl"):
        for line, record in iter_json_records(path, CORPUS_KEY):
            yield Document(f"{path}:{line}", text_blocks(_text_of(record, path, line)), False)
    elif name.endswith(".txt"):
        text = read_input_text(path, CORPUS_KEY)
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        yield Document(str(path), [Block(0, p) for p in paragraphs], False)
    # other files (images, stylesheets, ...) in a corpus folder are not text documents: skipped


# -- segmentation --------------------------------------------------------------------------------
def header_segments(blocks: list[Block]) -> Iterator[tuple[str, str]]:
    """(header, text) for every header: the text that follows it up to the next header of the same or a
    higher level, its sub-headers and their text included."""
    for i, block in enumerate(blocks):
        if block.level == 0:
            continue
        body = []
        for later in blocks[i + 1 :]:
            if 0 < later.level <= block.level:
                break
            body.append(later.text)
        yield block.text, "\n".join(body)


def paragraph_segments(blocks: list[Block], max_chars: int) -> Iterator[str]:
    """Runs of consecutive whole paragraphs, each as long as possible without passing `max_chars`."""
    run: list[str] = []
    size = 0
    for block in blocks:
        if run and size + 1 + len(block.text) > max_chars:
            yield "\n".join(run)
            run, size = [], 0
        run.append(block.text)
        size += len(block.text) + (1 if size else 0)
    if run:
        yield "\n".join(run)


def segment_documents(documents: Iterator[Document], max_chars: int) -> Iterator[dict]:
    """Segment records {source, header, text} of the documents, in order."""
    for document in documents:
        if document.has_headers:
            for header, text in header_segments(document.blocks):
                yield {"source": document.id, "header": header, "text": text}
        else:
            for text in paragraph_segments(document.blocks, max_chars):
                yield {"source": document.id, "header": None, "text": text}


# -- the unlabelled data of a run ------------------------------------------------------------------
def _sample_key(random_seed: int, segment_id: str) -> str:
    return hashlib.sha256(f"{random_seed}:{segment_id}".encode()).hexdigest()


def build_segments(data, random_seed: int, progress: bool = True) -> tuple[list[dict], list[dict], dict]:
    """(segments, dropped, report) of `data` (a DataConfig): every corpus cut into segments, the paper's filters
    applied (each dropped segment with its filter and reason), `num_segments` of the rest sampled. With
    `progress`, bars show the documents segmented and the slow filters.

    No segment left after the filters is a DataError with the counts of the funnel and the keys to change."""
    if not data.corpus_sources:
        raise DataError("data.corpus_sources is empty: name the corpora (files, folders, embedded names) to segment")
    documents = Counter()
    segments = []
    for source in data.corpus_sources:
        read = _counted(read_documents(source), documents, source)
        shown = progress_bar(read, f"segmenting {Path(source).name}", unit="doc", show=progress)
        for segment in segment_documents(shown, data.max_chars):
            segments.append({"id": f"seg-{len(segments):06d}", **segment})
    kept, dropped, funnel = apply_filters(segments, data, progress=progress)
    if not kept:
        raise DataError(_nothing_kept(data, sum(documents.values()), funnel))
    # The paper samples its 502k segments from what passed the filters; sampling by a seeded hash of
    # the id keeps the choice stable when the corpus grows, and the output stays in corpus order.
    ranked = sorted((s["id"] for s in kept), key=lambda i: _sample_key(random_seed, i))
    chosen = set(ranked[: data.num_segments])
    sampled = [dict(s, chars=len(s["text"])) for s in kept if s["id"] in chosen]
    funnel.append({"step": "sampled", "count": len(sampled), "removed": len(kept) - len(sampled)})
    report = {
        "documents": dict(documents),
        "funnel": [{"step": "documents", "count": sum(documents.values()), "removed": 0}, *funnel],
        "segments_by_source": dict(Counter(s["source"].split(":")[0] for s in sampled)),
    }
    return sampled, dropped, report


def _counted(documents, counter: Counter, source: str):
    for document in documents:
        counter[source] += 1
        yield document


def _nothing_kept(data, documents: int, funnel: list[dict]) -> str:
    """The error of a run whose filters keep no segment: how many were read, each filter's drops, what to change."""
    read = funnel[0]["count"]
    if not read:
        return (f"{CORPUS_KEY}: no segments in {documents:,} documents of {', '.join(data.corpus_sources)}: no text the"
                f" kit reads (in a folder, only {', '.join(CORPUS_FILES)} files, also compressed, are read)")
    drops = sorted((step for step in funnel[1:] if step["removed"]), key=lambda step: -step["removed"])
    counts = ", ".join(f"{step['step']} {step['removed']:,}" for step in drops)
    keys = "; ".join(key for step in drops if (key := FILTER_KEYS.get(step["step"])))
    change = f"change {keys}, or add corpora to {CORPUS_KEY}" if keys else f"add other corpora to {CORPUS_KEY}"
    return (f"{CORPUS_KEY}: no segment passed the filters: {read:,} segments read from {documents:,} documents, "
            f"dropped by filter: {counts}; {change}")
