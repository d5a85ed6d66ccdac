import json

import pytest

from humpback_nb.config import DataConfig, load_preset, with_overrides
from humpback_nb.method.data.filters import (
    apply_filters,
    exact_duplicate_filter,
    header_filter,
    length_filter,
    near_duplicate_filter,
    repeated_sentence_filter,
)
from humpback_nb.method.data.seed import DataError, build_seed, iter_json_records, select_oasst1
from humpback_nb.method.data.segments import (
    build_segments,
    header_segments,
    html_blocks,
    paragraph_segments,
    text_blocks,
    wiki_blocks,
)
from humpback_nb.method.data.stats import length_stats, table2
from humpback_nb.nb import tables
from humpback_nb.pipeline import open_run

NAV = DataConfig().navigation_headers
PROSE = ("Humpback whales travel thousands of kilometres between feeding and breeding grounds every year. "
         "Their songs can last for hours and change slowly from one season to the next. ")


def article(n=12):
    """About 800 characters of prose in which no two sentences repeat."""
    sentences = (f"Observation {i} recorded {i * 7} whales near station {i * 13} during survey {i}." for i in range(n))
    return " ".join(sentences)


def seg(text, header=None, id="s"):
    return {"id": id, "text": text, "header": header}


def ids(records):
    return [r["id"] for r in records]


# -- filters: one case each keeps, one it drops ----------------------------------------------------
@pytest.mark.parametrize("header, kept", [
    ("History", True), (None, True), ("Forum rules and etiquette", False), ("Quick Links", False),
    ("Free Newsletter", False), ("ADVERTISEMENT", False), ("CONTACT US TODAY", False), ("  ", False),
    ("— 1 —", False), ("Forums of ancient Rome", False), ("Formulas", True), ("The NASA years", True),
])
def test_header_filter(header, kept):
    result, dropped = header_filter([seg(PROSE, header)], NAV)
    assert bool(result) == kept
    if not kept:
        assert dropped[0]["filter"] == "header" and dropped[0]["reason"]


def test_length_filter_bounds_are_inclusive():
    segments = [seg("x" * n, id=str(n)) for n in (599, 600, 3000, 3001)]
    kept, dropped = length_filter(segments, 600, 3000)
    assert ids(kept) == ["600", "3000"]
    assert [d["reason"] for d in dropped] == ["too short (599 < 600 characters)", "too long (3001 > 3000 characters)"]


def test_repeated_sentence_filter():
    repeated = seg("Buy the best shoes online today. We ship worldwide for free. Buy the best shoes online today!",
                   id="r")
    varied = seg(PROSE, id="v")
    short_repeats = seg("Yes. Yes. " + PROSE, id="y")  # sentences under four words are not compared
    kept, dropped = repeated_sentence_filter([repeated, varied, short_repeats], threshold=0.8)
    assert ids(kept) == ["v", "y"] and ids(dropped) == ["r"]
    assert "Jaccard 1.00" in dropped[0]["reason"]


def test_exact_duplicate_filter_ignores_case_and_spacing():
    kept, dropped = exact_duplicate_filter([seg(PROSE, id="a"), seg(PROSE.upper().replace(" ", "  "), id="b"),
                                            seg(PROSE + "More.", id="c")])
    assert ids(kept) == ["a", "c"]
    assert dropped[0]["reason"] == "exact duplicate of a"


def test_near_duplicate_filter():
    base = " ".join(f"word{i} topic{i % 7} fact{i % 11}" for i in range(120))
    edited = base.replace("word60 ", "changed ")
    other = " ".join(f"other{i} thing{i % 5}" for i in range(150))
    kept, dropped = near_duplicate_filter([seg(base, id="a"), seg(edited, id="b"), seg(other, id="c")], 0.8)
    assert ids(kept) == ["a", "c"]
    assert dropped[0]["reason"].startswith("near duplicate of a (Jaccard 0.9")


def test_apply_filters_funnel_adds_up():
    segments = [seg(article(), "Intro", "a"), seg(article(), "Intro", "b"), seg("short", "Body", "c"),
                seg(article(), "Advertisement", "d"), seg(PROSE * 5, "Body", "e")]
    kept, dropped, funnel = apply_filters(segments, DataConfig())
    assert ids(kept) == ["a"]
    assert [step["step"] for step in funnel] == ["segments", "header", "length", "repeated", "exact", "near"]
    assert funnel[0]["count"] - funnel[-1]["count"] == len(dropped) == sum(s["removed"] for s in funnel)


# -- segmentation ----------------------------------------------------------------------------------
PAGE = """<!doctype html><html><head><title>t</title><style>p {color: red}</style></head><body>
<nav><a href="/">Home</a></nav>
<h1>Whales</h1><p>Intro &amp; overview.</p>
<h2>Songs</h2><p>Males sing.</p>
<h3>Structure</h3><p>Themes repeat.</p><script>var x = "not text";</script>
<h2>Migration</h2><ul><li>Feeding grounds.</li><li>Breeding grounds.</li></ul>
</body></html>"""


def test_html_header_segments_include_sub_headers_and_stop_at_the_next_peer():
    segments = dict(header_segments(html_blocks(PAGE)))
    assert segments["Songs"] == "Males sing.\nStructure\nThemes repeat."
    assert segments["Structure"] == "Themes repeat."
    assert segments["Migration"] == "Feeding grounds.\nBreeding grounds."
    assert segments["Whales"].startswith("Intro & overview.\nSongs") and "Migration" in segments["Whales"]
    assert "not text" not in "".join(segments.values()) and "color" not in "".join(segments.values())


def test_text_that_is_not_html_is_refused():
    with pytest.raises(DataError, match="page.html: does not look like HTML"):
        html_blocks("just some words", "page.html")


def test_wiki_markup_is_cleaned_into_headers_and_paragraphs():
    markup = ("{{Infobox whale|name=x}}'''Humpback''' whales are [[baleen whale|baleen whales]].<ref>Source</ref>\n"
              "[[File:Whale.jpg|thumb|A [[whale]]]]\n== Songs ==\nMales [[sing]] {{cite|x}}.\n"
              "=== Structure ===\n* Themes repeat.\n{| class=wikitable\n| a || b\n|}\n== See also ==\n")
    blocks = [(b.level, b.text) for b in wiki_blocks(markup)]
    assert blocks == [(0, "Humpback whales are baleen whales."), (2, "Songs"), (0, "Males sing ."),
                      (3, "Structure"), (0, "Themes repeat."), (2, "See also")]


def test_plain_text_packs_whole_paragraphs():
    blocks = text_blocks("a" * 400 + "\n" + "b" * 400 + "\n" + "c" * 400)
    assert [len(s) for s in paragraph_segments(blocks, 1000)] == [801, 400]
    glued = text_blocks("First paragraph ends here.Second one starts. It goes on.", glued=True)
    assert [b.text for b in glued] == ["First paragraph ends here.", "Second one starts. It goes on."]


# -- progress ----------------------------------------------------------------------------------------
def test_segmenting_and_the_slow_filters_show_bars(tmp_path, capsys):
    corpus = tmp_path / "whales.txt"
    corpus.write_text("\n\n".join([article(12), article(12), article(14)]))  # a copy, and a near copy for MinHash
    data = DataConfig(corpus_sources=[str(corpus)], num_segments=10, max_chars=1000)
    kept, dropped, _ = build_segments(data, random_seed=0)
    assert len(kept) == 1 and [d["filter"] for d in dropped] == ["exact", "near"]
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("segmenting whales.txt: 1doc") for line in bars), bars
    for name in ("filter: repeated sentences", "filter: near duplicates (MinHash)"):
        assert any(line.startswith(f"{name}: 100%") for line in bars), bars
    build_segments(data, random_seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_a_filter_with_nothing_to_do_shows_no_bar(capsys):
    assert near_duplicate_filter([], 0.8, progress=True) == ([], [])
    assert repeated_sentence_filter([], 0.8, progress=True) == ([], [])
    assert capsys.readouterr().err == ""


# -- seed data -------------------------------------------------------------------------------------
def message(mid, parent, role, text, lang="en", rank=None, quality=None, deleted=False, tree="t"):
    labels = {"name": ["spam", "quality"], "value": [0.0, quality], "count": [3, 3]} if quality is not None else None
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-01T00:00:00Z",
            "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": True,
            "deleted": deleted, "rank": rank, "synthetic": False, "model_name": None,
            "detoxify": None, "message_tree_id": tree, "tree_state": "ready_for_export", "emojis": None,
            "labels": labels}


def oasst1_rows():
    """Six message trees in the oasst1 row format, each testing one rule of the selection."""
    return [
        message("a", None, "prompter", "How do whales sleep?", tree="A"),
        message("a1", "a", "assistant", "Whales rest one half of the brain at a time.", rank=0, quality=0.9, tree="A"),
        message("a2", "a", "assistant", "They do not.", rank=1, quality=0.2, tree="A"),
        message("a3", "a1", "prompter", "And dolphins?", tree="A"),  # a second turn: never a seed pair
        message("b", None, "prompter", "¿Cómo duermen las ballenas?", lang="es", tree="B"),
        message("b1", "b", "assistant", "Con medio cerebro.", lang="es", rank=0, quality=0.9, tree="B"),
        message("c", None, "prompter", "Tell me about krill.", tree="C"),
        message("c1", "c", "assistant", "Krill are small.", rank=0, quality=0.3, tree="C"),
        message("d", None, "prompter", "Why do whales sing?", tree="D"),
        message("d1", "d", "assistant", "Nobody knows.", rank=1, quality=0.8, tree="D"),
        message("e", None, "prompter", "What is a baleen?", tree="E"),
        message("e1", "e", "assistant", "Baleen is a filter made of keratin.", rank=0, quality=0.7, tree="E"),
        message("f", None, "prompter", "Deleted question", deleted=True, tree="F"),
        message("f1", "f", "assistant", "Deleted answer", rank=0, quality=1.0, tree="F"),
    ]


def test_oasst1_selection_takes_english_first_turns_with_the_rank0_reply_best_first():
    pairs, counts = select_oasst1(oasst1_rows(), n=10, min_quality=0.5)
    assert [(p["instruction"], p["output"]) for p in pairs] == [
        ("How do whales sleep?", "Whales rest one half of the brain at a time."),
        ("What is a baleen?", "Baleen is a filter made of keratin."),
    ]
    assert [p["source"] for p in pairs] == ["oasst1:a1", "oasst1:e1"]
    assert counts["first turns"] == 6 and counts["not en"] == 1 and counts["no rank-0 reply"] == 1
    assert counts["reply quality below 0.5"] == 1 and counts["prompt deleted or failed review"] == 1


def test_oasst1_file_becomes_top_n_seed_and_heldout(tmp_path):
    path = tmp_path / "oasst1_sample.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in oasst1_rows()))
    data = DataConfig(seed_source=str(path), seed_size=1, heldout_size=1)
    records, counts = build_seed(data, random_seed=0)
    assert [(r["split"], r["source"]) for r in records] == [("train", "oasst1:a1"), ("heldout", "oasst1:e1")]
    assert counts["train"] == 1 and counts["heldout"] == 1


def test_oasst1_rows_that_are_not_oasst1_are_refused():
    with pytest.raises(DataError, match="row 1: not an oasst1 message row"):
        select_oasst1([{"message_id": "x", "text": "t"}], n=1)


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2: not valid JSON"),
    (b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', "line 3: missing field 'output'"),
    (b'{"instruction": "  ", "output": "b"}\n', "line 1: field 'instruction' is empty"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n', "line 2: not UTF-8"),
    (b'{"instruction": 3, "output": "b"}\n', "line 1: field 'instruction' must be text, got int"),
    (b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "output": ""}\n]',
     "line 3: field 'output' is empty"),
    (b'[\n  {"instruction": "a", "output": "b"},\n  "text"\n]', "line 3: expected a JSON object, got str"),
])
def test_bad_seed_files_name_file_line_and_problem(tmp_path, content, message):
    path = tmp_path / ("seed.json" if content.startswith(b"[") else "seed.jsonl")
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path.name}, {message}"):
        build_seed(DataConfig(seed_source=str(path)), random_seed=0)


def test_a_bad_seed_file_leaves_nothing_in_the_run_folder(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    config = with_overrides(load_preset("tiny"), {"data.seed_source": str(path)})
    folder = open_run(tmp_path / "run")
    with pytest.raises(DataError, match="line 2: missing field 'output'"):
        folder.run(config, until="seed", log=lambda _: None)
    assert sorted(p.name for p in folder.path.iterdir()) == ["config.yaml"]


def test_alpaca_json_records_carry_their_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n\n {"instruction": "c", "output": "d"}]')
    assert [line for line, _ in iter_json_records(path)] == [1, 3]


# -- stats -----------------------------------------------------------------------------------------
def test_table2_numbers():
    rows = table2({"seed": [{"instruction": "ab", "output": "abcd"}, {"instruction": "abcd", "output": "ab"}]})
    assert rows[0]["count"] == 2 and rows[0]["instruction"] == (3.0, 1.0) and rows[0]["output"] == (3.0, 1.0)
    assert rows[0]["paper_count"] == 3200 and rows[0]["paper_instruction"] == (148, 322)
    assert "| seed | 2 | 3 ± 1 | 3 ± 1 | 3,200 | 148 ± 322 | 1,072 ± 818 |" in tables.table2(rows)
    assert length_stats([]) is None


# -- the stages ------------------------------------------------------------------------------------
def test_tiny_data_stages(tmp_path):
    config = load_preset("tiny")
    folder = open_run(tmp_path / "run")
    assert folder.run(config, until="segments", log=lambda _: None) == {"seed": "ran", "segments": "ran"}
    train, heldout = folder.files.seed_pairs("train"), folder.files.seed_pairs("heldout")
    assert (len(train), len(heldout)) == (config.data.seed_size, config.data.heldout_size)
    assert len({r["id"] for r in train + heldout}) == len(train + heldout)
    segments = folder.files.segments()
    assert len(segments) == config.data.num_segments
    assert all({"id", "text", "header", "source", "chars"} <= set(s) for s in segments)


@pytest.mark.slow
def test_demo_preset_gives_at_least_200_segments_that_pass_every_filter(tmp_path):
    config = load_preset("demo")
    folder = open_run(tmp_path / "run")
    folder.run(config, until="segments", log=lambda _: None)
    segments = folder.files.segments()
    assert len(segments) >= 200
    kept, dropped, _ = apply_filters(segments, config.data)
    assert not dropped
    report = folder.files.segments_report()
    assert report["funnel"][-1] == {"step": "sampled", "count": len(segments),
                                    "removed": report["funnel"][-2]["count"] - len(segments)}
