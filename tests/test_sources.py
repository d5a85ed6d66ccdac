import dataclasses
import json
import shutil

import pytest

from humpback_nb.infra import sources
from humpback_nb.infra.files import read_jsonl
from humpback_nb.infra.sources import SOURCES, SourceError, cache_dir, fetch, fetch_archive, sha256_file


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh cache seeded with the real (already checked) alpaca-eval sdist, so no test downloads it twice."""
    real = fetch_archive(sources.ALPACA_EVAL)
    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "cache"))
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(real, downloads / real.name)
    return downloads / real.name


def test_every_embedded_default_is_fetched_and_checked():
    for name, source in SOURCES.items():
        archive = fetch_archive(source.archive)
        assert sha256_file(archive) == source.archive.sha256
        assert fetch(name).stat().st_size > 0, name


def test_embedded_data_has_the_expected_shape():
    prompts = json.loads(fetch("alpaca_eval_prompts").read_text())
    assert len(prompts) == 805
    assert {p["dataset"] for p in prompts} == {"vicuna", "koala", "oasst", "selfinstruct", "helpful_base"}
    questions = read_jsonl(fetch("mt_bench_questions"))
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    seed = json.loads(fetch("alpaca_en_demo").read_text())
    assert {"instruction", "input", "output"} <= set(seed[0])
    assert all("text" in row for row in read_jsonl(fetch("c4_demo")))
    assert fetch("smollm2-135m-gguf").read_bytes()[:4] == b"GGUF"


def test_second_fetch_uses_the_cache(private_cache, monkeypatch):
    first = fetch("alpaca_eval_prompts")
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch("alpaca_eval_prompts") == first


def test_a_cached_archive_that_fails_its_hash_is_refused_and_removed(private_cache):
    data = bytearray(private_cache.read_bytes())
    data[len(data) // 2] ^= 0xFF
    private_cache.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="sha256 .* does not match the pinned"):
        fetch("alpaca_eval_prompts")
    assert not private_cache.exists()


def test_a_download_with_the_wrong_hash_leaves_nothing(private_cache, monkeypatch):
    private_cache.unlink()
    wrong = dataclasses.replace(sources.ALPACA_EVAL, sha256="0" * 64)
    with pytest.raises(SourceError, match="does not match the pinned 0000"):
        fetch_archive(wrong)
    assert list(private_cache.parent.iterdir()) == []


def test_a_failed_download_says_what_failed(private_cache):
    missing = dataclasses.replace(sources.ALPACA_EVAL, version="0.0.0.404", filename="alpaca_eval-0.0.0.404.tar.gz")
    with pytest.raises(SourceError, match=r"could not download alpaca-eval==0\.0\.0\.404 \(sdist\) with pip"):
        fetch_archive(missing)


def test_a_tampered_unpacked_file_is_unpacked_again(private_cache):
    path = fetch("alpaca_eval_prompts")
    good = path.read_bytes()
    path.write_bytes(b"[]")
    assert fetch("alpaca_eval_prompts").read_bytes() == good


def test_unknown_source():
    with pytest.raises(SourceError, match="unknown embedded source 'nope'"):
        fetch("nope")
