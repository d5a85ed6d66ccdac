"""The benchmarks count what the kit's loops read: their figures are only as right as these counts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


class Reader:
    """An engine that keeps the rows it is asked to read and answers equal log-probabilities."""

    name, workers = "reader", 1

    def __init__(self, tokenizer):
        self.tokenizer, self.rows = tokenizer, []

    def next_token_logprobs(self, rows, tokens, batch_size=8):
        self.rows += [list(r) for r in rows]
        return [[-1.6] * len(tokens) for _ in rows]


def test_bench_curate_counts_the_tokens_the_rater_reads(embedded_checkpoint):
    from bench_curate import logprob_tokens

    from humpback_nb.config import load_preset
    from humpback_nb.infra.models import load_tokenizer
    from humpback_nb.method.curate import rate_logprob

    config = load_preset("demo")
    tokenizer = load_tokenizer(config.model)
    pairs = [{"id": str(i), "instruction": f"Name {i} colours.", "output": "red, green " * (i + 1)} for i in range(3)]
    reader = Reader(tokenizer)
    rate_logprob(reader, pairs, config.curate, config.model.context_length, progress=False)
    prefix, tails = logprob_tokens(tokenizer, pairs, config.curate, config.model.context_length)
    assert sorted(prefix + tail for tail in tails) == sorted(len(row) for row in reader.rows)
    assert all(row[:prefix] == reader.rows[0][:prefix] for row in reader.rows)  # the rubric every row opens with
