import math

import pytest

from humpback_nb.config import ConfigError
from humpback_nb.method.analysis import PAPER_SHARES, labelled_set, scaling_sources


def test_labelled_set_has_a_fifth_of_positives_and_says_where_labels_come_from():
    heldout = [{"id": f"s{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    candidates = [{"id": f"c{i}", "instruction": f"cq{i}", "output": f"ca{i}"} for i in range(40)]
    pairs = labelled_set(heldout, candidates, positives=5, rng_seed=0)
    positives = [p for p in pairs if p["label"] == 1]
    negatives = [p for p in pairs if p["label"] == 0]
    assert len(positives) == 5 and len(negatives) == 20
    assert all(p["id"].startswith("positive-s") for p in positives)
    for pair in negatives:  # an instruction with another candidate's output
        assert pair["instruction"][2:] != pair["output"][2:]


def test_the_papers_table7_set_is_50_positives_of_250_and_too_few_heldout_pairs_is_a_config_error():
    heldout = [{"id": f"s{i}", "instruction": f"q{i}", "output": f"a{i}"} for i in range(60)]
    candidates = [{"id": f"c{i}", "instruction": f"cq{i}", "output": f"ca{i}"} for i in range(300)]
    pairs = labelled_set(heldout, candidates, positives=50, rng_seed=0)
    assert (len(pairs), sum(p["label"] for p in pairs)) == (250, 50)
    with pytest.raises(ConfigError, match=r"needs 50 held-out.*kept 20 \(data.heldout_size\)"):
        labelled_set(heldout[:20], candidates, positives=50, rng_seed=0)


def test_scaling_sources_keep_the_papers_shares_in_a_random_order():
    candidates = [{"id": str(i), "instruction": "q", "output": "a"} for i in range(100)]
    scores = [{"id": str(i), "score": 1 + 4 * i / 99} for i in range(100)]
    sources = scaling_sources(candidates, scores, rng_seed=0)
    assert list(sources) == ["top 8.3%", "top 38.8%", "no curation"]
    assert len(sources["top 8.3%"]) == math.ceil(100 * PAPER_SHARES["A5"]) == 9
    assert sorted(int(c["id"]) for c in sources["top 8.3%"]) == list(range(91, 100))
    assert [c["id"] for c in sources["top 8.3%"]] != [str(i) for i in range(99, 90, -1)]  # not best first
    assert len(sources["top 38.8%"]) == 39 and len(sources["no curation"]) == 100
    assert sorted(c["id"] for c in sources["no curation"]) == sorted(c["id"] for c in candidates)
