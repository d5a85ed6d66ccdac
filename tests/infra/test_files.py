import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from humpback_nb.infra.files import (
    RecordError,
    atomic_dir,
    atomic_write_text,
    clean_temporaries,
    read_jsonl,
    write_jsonl,
)


def test_jsonl_round_trip(tmp_path):
    records = [{"id": i, "text": f"ünïcode {i}"} for i in range(3)]
    assert write_jsonl(tmp_path / "r.jsonl", records) == 3
    assert read_jsonl(tmp_path / "r.jsonl") == records


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "r.jsonl"
    write_jsonl(target, [{"id": 0}])

    def records():
        yield {"id": 1}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(target, records())
    assert read_jsonl(target) == [{"id": 0}]
    assert os.listdir(tmp_path) == ["r.jsonl"]


def test_a_killed_write_leaves_no_partial_file(tmp_path):
    """SIGKILL in the middle of a write: the target is absent (or old), never half-written."""
    target = tmp_path / "big.jsonl"
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import pathlib, time
        from humpback_nb.infra.files import write_jsonl
        def records():
            for i in range(10**9):
                if i == 1000:
                    pathlib.Path({str(ready)!r}).touch()
                if i >= 1000:
                    time.sleep(0.01)
                yield {{"id": i, "text": "x" * 100}}
        write_jsonl({str(target)!r}, records())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(600):
        if ready.exists() or proc.poll() is not None:
            break
        import time

        time.sleep(0.05)
    assert ready.exists(), "the writer never got going"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = clean_temporaries(tmp_path)
    assert leftovers, "the interrupted write should have left only a temporary file"
    assert sorted(os.listdir(tmp_path)) == ["ready"]


def test_atomic_dir_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "b.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("broken")
        raise ValueError("crash while saving")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"id": 1}\n{"id": 2\n', r"line 2: not valid JSON"),
        (b'{"id": 1}\n\n[1, 2]\n', r"line 3: expected a JSON object, got list"),
        (b'{"id": 1}\n{"text": "\xff\xfe"}\n', r"line 2: not UTF-8"),
        (b'{"id": 1}\n{"text": "' + b"a" * 2**24 + b'"}\n', r"line 2: 16,777,2\d\d characters on one line"),
        ("{\"id\": 1}\n{\"text\": \"caf\u00e9\"}\n".encode("utf-16"), r"line 1: not UTF-8"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=rf"bad\.jsonl, {message}"):
        read_jsonl(path)


def test_atomic_text_is_utf8(tmp_path):
    path = atomic_write_text(tmp_path / "t.txt", json.dumps({"a": "é"}, ensure_ascii=False))
    assert path.read_bytes() == '{"a": "é"}'.encode()


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import builtins
    import errno

    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": 1}])
    real_open = builtins.open

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, text):
            self.written += len(text)
            if self.written > 64:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    def opener(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and ".tmp-" in str(file) else handle

    monkeypatch.setattr(builtins, "open", opener)
    with pytest.raises(OSError, match="No space left"):
        write_jsonl(path, ({"id": i, "text": "x" * 20} for i in range(100)))
    monkeypatch.undo()
    assert read_jsonl(path) == [{"id": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
