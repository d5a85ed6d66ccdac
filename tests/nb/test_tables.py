"""Notebook 07 puts one line under every table on what the run does differently from the paper."""

import pytest

from humpback_nb.config import load_preset, with_overrides
from humpback_nb.nb.tables import differences

TABLES = ("table2", "table4", "figure3", "table7", "table8")


@pytest.mark.parametrize("table", TABLES)
def test_each_table_has_one_line_of_differences_read_from_the_config(table):
    line = differences(load_preset("demo"), table)
    assert line.startswith("*What differs from the paper:*") and "\n" not in line
    assert "smollm2-135m" in line and "the paper:" in line


def test_the_line_follows_the_runs_judge_and_data():
    demo = load_preset("demo")
    assert "local judge" in differences(demo, "table4")
    endpoint = with_overrides(demo, {"evaluate.judge": "gpt-4", "evaluate.judge_url": "http://127.0.0.1:1/v1"})
    assert "gpt-4 at an endpoint" in differences(endpoint, "table4")
    assert "120 seed pairs of alpaca_en_demo" in differences(demo, "table2")
    # the instruction cap and what happens to an instruction cut off there
    paper = load_preset("paper-7b")
    assert "instructions written up to 512 new tokens (longer ones dropped)" in differences(paper, "table2")
    assert "(longer ones kept, cut off)" in differences(load_preset("tiny"), "table2")
    assert "N in [4, 16]" in differences(demo, "figure3")
    assert "labels by construction" in differences(demo, "table7")
    with pytest.raises(ValueError, match="unknown table"):
        differences(demo, "table9")
