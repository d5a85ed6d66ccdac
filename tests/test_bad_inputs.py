"""Bad data inputs through the real `humpback` command: one line naming the file (or key) and the problem, exit
status 2, no traceback, nothing written to the run folder's outputs."""

import bz2
import contextlib
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import humpback_nb.method.data.segments  # noqa: F401  (imported before a test forks a process without root)
import humpback_nb.stages  # noqa: F401
from humpback_nb.cli import main
from humpback_nb.infra.files import RecordError
from humpback_nb.method.analysis import read_labels
from humpback_nb.run import RunFiles

PROSE = ("Humpback whales travel thousands of kilometres between feeding and breeding grounds every year, and "
         "their songs change slowly from one season to the next. ")
SEED = b'{"instruction": "How do whales sleep?", "output": "One half of the brain at a time."}\n'
CORPUS = json.dumps({"text": PROSE * 8}).encode() + b"\n"
LABELS = b'{"instruction": "How do whales sleep?", "output": "One half of the brain at a time.", "label": 1}\n'
ZSTD_FRAME_START = b"\x28\xb5\x2f\xfd"


def survey(n: int) -> str:
    """About 900 characters of prose in which no two sentences (and no two surveys) look alike."""
    return " ".join(f"In survey {n}, observation {i} counted {i * 7 + n} whales near station {i * 13 + n * 101}."
                    for i in range(12))


def bad_file(folder: Path, kind: str, name: str, good: bytes) -> tuple[Path, str]:
    """A file named like `name` that cannot be used in the way `kind` says, and the problem its error must name."""
    cases = {
        "missing": (name, None, "no such"),  # "no such file", "no such corpus file or folder"
        "folder": (name, "mkdir", "a folder, not a file"),
        "empty": (name, b"", "empty file"),
        "not UTF-8": (name, good + b'{"text": "caf\xe9"}\n', "line 2: not UTF-8 text"),
        "not gzip": (name + ".gz", good, "not a gzip file, though its name ends in .gz"),
        "truncated gzip": (name + ".gz", gzip.compress(good * 50)[:-30], "the gzip data ends early"),
        "not bzip2": (name + ".bz2", good, "not a bzip2 file, though its name ends in .bz2"),
        "truncated bzip2": (name + ".bz2", bz2.compress(good * 50)[:-30], "the bzip2 data ends early"),
        "not zstd": (name + ".zst", good, "not a zstd file, though its name ends in .zst"),
        "zstd": (name + ".zst", ZSTD_FRAME_START + b"\x00" * 16, "a zstd file, which the kit does not read"),
    }
    filename, content, problem = cases[kind]
    path = folder / filename
    if content == "mkdir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path, problem


KINDS = ["missing", "folder", "empty", "not UTF-8", "not gzip", "truncated gzip", "not bzip2", "truncated bzip2",
         "not zstd", "zstd"]


def humpback(capsys, *args: str) -> tuple[int, str]:
    """Exit status and the one error line of `humpback ARGS`; fails on a traceback or several error lines."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("humpback: error:")]
    assert len(errors) == (code != 0), err
    return code, errors[0] if errors else ""


def leftovers(run: Path) -> list[str]:
    """Temporary files of interrupted writes anywhere in the run folder."""
    return [str(p) for p in run.rglob(".tmp-*")]


def run_args(run: Path, until: str, *settings: str) -> list[str]:
    return ["run", "--preset", "tiny", "--run-dir", str(run), "--until", until,
            *(arg for setting in settings for arg in ("--set", setting))]


# -- input files that cannot be opened -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_seed_file_that_cannot_be_read_stops_the_seed_stage(tmp_path, capsys, kind):
    path, problem = bad_file(tmp_path, kind, "seed.jsonl", SEED)
    run = tmp_path / "run"
    code, error = humpback(capsys, *run_args(run, "seed", f"data.seed_source={path}"))
    assert code == 2
    assert str(path) in error and problem in error, error
    if kind != "not UTF-8":  # a decoding error names the line; the others name the key
        assert "(data.seed_source)" in error
    files = RunFiles(run)
    assert not files.path("seed").exists() and files.manifest("seed") is None and not leftovers(run)


@pytest.mark.parametrize("kind", KINDS)
def test_a_corpus_file_that_cannot_be_read_stops_the_segments_stage(tmp_path, capsys, kind):
    path, problem = bad_file(tmp_path, kind, "corpus.jsonl", CORPUS)
    if kind == "folder":  # a corpus may be a folder: this one holds no documents
        problem = "no segments in 0 documents"
    run = tmp_path / "run"
    code, error = humpback(capsys, *run_args(run, "segments", f"data.corpus_sources=[{path}]"))
    assert code == 2
    assert str(path) in error and problem in error, error
    files = RunFiles(run)
    assert files.path("seed").exists()  # the stage before it finished
    outputs = [files.path("segments"), files.path("segments_dropped"), files.path("segments_report")]
    assert not any(p.exists() for p in outputs) and files.manifest("segments") is None and not leftovers(run)


def test_a_bad_file_in_a_corpus_folder_is_named(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_bytes(CORPUS)
    (corpus / "notes.csv").write_bytes(b"not, a, corpus\n")  # a file of another kind in a folder is skipped
    (corpus / "b.txt.gz").write_bytes(b"plain text, not gzip")
    code, error = humpback(capsys, *run_args(tmp_path / "run", "segments", f"data.corpus_sources=[{corpus}]"))
    assert code == 2 and f"{corpus / 'b.txt.gz'}: not a gzip file" in error


def test_a_corpus_file_of_an_unknown_kind_named_on_its_own_is_refused(tmp_path, capsys):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nsome words\n")
    code, error = humpback(capsys, *run_args(tmp_path / "run", "segments", f"data.corpus_sources=[{path}]"))
    assert code == 2 and f"{path}: not a corpus file the kit reads" in error


@pytest.mark.parametrize("kind", KINDS)
def test_a_labels_file_that_cannot_be_read_is_one_clear_error(tmp_path, kind):
    path, problem = bad_file(tmp_path, kind, "labels.jsonl", LABELS)
    with pytest.raises(RecordError) as caught:  # the CLI turns RecordError into exit status 2
        read_labels(path)
    message = str(caught.value)
    assert str(path) in message and problem in message and "\n" not in message


def test_compressed_input_files_are_read(tmp_path, capsys):
    seed = tmp_path / "seed.jsonl.bz2"
    pairs = [{"instruction": f"Question {i} about whales?", "output": f"Answer {i}."} for i in range(30)]
    seed.write_bytes(bz2.compress("".join(json.dumps(p) + "\n" for p in pairs).encode()))
    corpus = tmp_path / "corpus.txt.gz"
    corpus.write_bytes(gzip.compress("\n\n".join(survey(i) for i in range(3)).encode()))
    labels = tmp_path / "labels.jsonl.gz"
    labels.write_bytes(gzip.compress(LABELS))
    run = tmp_path / "run"
    code, error = humpback(capsys, *run_args(run, "segments", f"data.seed_source={seed}",
                                             f"data.corpus_sources=[{corpus}]"))
    assert code == 0, error
    assert len(RunFiles(run).seed_pairs("train")) == 24
    assert [s["text"].count("In survey 2,") for s in RunFiles(run).segments()] == [12]  # 3 paragraphs, 1 segment
    assert read_labels(labels)[0]["label"] == 1


# -- no permission: root reads every file, so as root the command runs in a child process as nobody ---------
@contextlib.contextmanager
def open_to_everyone():
    """A folder that a process running as nobody can use (pytest's tmp_path is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="humpback-permission-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def without_privileges(function, folder: Path) -> tuple[int, str]:
    """(exit status, stderr) of `function()`: in this process for a user without root, else in a forked child
    that gives up root first (the modules it needs are imported already)."""
    log = folder / "stderr.txt"
    if os.geteuid() != 0:
        with open(log, "w") as err, contextlib.redirect_stderr(err):
            code = function()
        return code, log.read_text()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with open(log, "w") as err, contextlib.redirect_stderr(err):
                code = function()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), log.read_text()


def test_a_seed_file_without_read_permission(capsys):
    with open_to_everyone() as folder:
        path = folder / "seed.jsonl"
        path.write_bytes(SEED * 40)
        path.chmod(0)
        run = folder / "run"
        code, err = without_privileges(lambda: main(run_args(run, "seed", f"data.seed_source={path}")), folder)
        assert code == 2, err
        assert err.strip() == f"humpback: error: {path}: permission denied, the file cannot be read (data.seed_source)"
        assert not RunFiles(run).path("seed").exists() and not leftovers(run)


def test_a_corpus_file_without_read_permission(capsys):
    with open_to_everyone() as folder:
        seed = folder / "seed.jsonl"
        seed.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": f"A{i}."}) + "\n" for i in range(30)))
        corpus = folder / "corpus"
        corpus.mkdir()
        (corpus / "page.html").write_text(f"<h1>Whales</h1><p>{PROSE * 8}</p>")
        (corpus / "page.html").chmod(0)
        run = folder / "run"
        args = run_args(run, "segments", f"data.seed_source={seed}", f"data.corpus_sources=[{corpus}]")
        code, err = without_privileges(lambda: main(args), folder)
        assert code == 2, err
        assert err.strip().splitlines()[-1] == (f"humpback: error: {corpus / 'page.html'}: permission denied, the file "
                                                "cannot be read (data.corpus_sources)")
        assert not RunFiles(run).path("segments").exists() and not leftovers(run)


def test_a_labels_file_without_read_permission():
    def read() -> int:
        try:
            read_labels(path)
        except RecordError as err:
            print(err, file=sys.stderr)
            return 2
        return 0

    with open_to_everyone() as folder:
        path = folder / "labels.jsonl"
        path.write_bytes(LABELS)
        path.chmod(0)
        code, err = without_privileges(read, folder)
        assert (code, err.strip()) == (2, f"{path}: permission denied, the file cannot be read "
                                          "(evaluate.selection_labels)")


# -- the data itself ----------------------------------------------------------------------------------------
def test_filters_that_keep_no_segment_stop_the_stage_with_the_counts(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"  # three documents' worth of short paragraphs, all under data.min_chars
    corpus.write_text("\n\n".join(f"Short paragraph {i} about whales." for i in range(5)))
    run = tmp_path / "run"
    code, error = humpback(capsys, *run_args(run, "segments", f"data.corpus_sources=[{corpus}]"))
    assert code == 2
    assert error == ("humpback: error: data.corpus_sources: no segment passed the filters: 1 segments read from "
                     "1 documents, dropped by filter: length 1; change data.min_chars, data.max_chars, or add "
                     "corpora to data.corpus_sources")
    assert not RunFiles(run).path("segments").exists() and not leftovers(run)


def test_corpora_without_text_the_kit_reads_stop_the_stage(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "table.csv").write_text("a,b\n1,2\n")
    code, error = humpback(capsys, *run_args(tmp_path / "run", "segments", f"data.corpus_sources=[{corpus}]"))
    assert code == 2 and "data.corpus_sources: no segments in 0 documents" in error


def seed_lines(n: int, duplicates: int = 0) -> str:
    pairs = [{"instruction": f"Question {i} about whales?", "output": f"Answer {i}."} for i in range(n)]
    # the same pairs again, spaced differently: repeats once whitespace is normalised
    pairs += [{"instruction": f"Question  {i} about whales? ", "output": f"\nAnswer {i}."} for i in range(duplicates)]
    return "".join(json.dumps(p) + "\n" for p in pairs)


def test_too_few_seed_pairs_stop_the_seed_stage_with_both_counts(tmp_path, capsys):
    path = tmp_path / "seed.jsonl"
    path.write_text(seed_lines(26, duplicates=3))  # 29 lines, 26 pairs; tiny asks for 24 + 4
    run = tmp_path / "run"
    code, error = humpback(capsys, *run_args(run, "seed", f"data.seed_source={path}"))
    assert code == 2
    assert error == (f"humpback: error: {path}: 26 usable seed pairs (dropped: duplicates 3), fewer than the 28 that "
                     "data.seed_size (24) + data.heldout_size (4) ask for: lower data.seed_size or "
                     "data.heldout_size, or name a larger data.seed_source")
    assert not RunFiles(run).path("seed").exists()


def test_duplicate_seed_pairs_are_dropped_and_counted_in_the_report(tmp_path, capsys):
    path = tmp_path / "seed.jsonl"
    path.write_text(seed_lines(28, duplicates=5))
    run = tmp_path / "run"
    code, _ = humpback(capsys, *run_args(run, "seed", f"data.seed_source={path}"))
    assert code == 0
    files = RunFiles(run)
    pairs = files.seed_pairs("train") + files.seed_pairs("heldout")
    assert len({(p["instruction"], p["output"]) for p in pairs}) == len(pairs) == 28
    assert all("  " not in p["instruction"] for p in pairs)  # the first of each repeated pair is the one kept
    assert files.manifest("seed")["report"]["duplicates_dropped"] == 5


@pytest.mark.parametrize("setting, stage, named", [
    ("data.seed_source=oasst1", "seed", "OpenAssistant/oasst1: could not be loaded from the Hugging Face hub"),
    ("model.name=nobody/no-such-model", "backward", "nobody/no-such-model: could not be loaded from the Hugging Face"),
])
def test_a_hub_resource_out_of_reach_is_one_line_naming_it_and_the_key(setting, stage, named, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--set", setting, "--run-dir", str(run_dir), "--until", stage]) == 2
    err = capsys.readouterr().err
    line = [line for line in err.splitlines() if line.startswith("humpback: error:")]
    assert len(line) == 1 and named in line[0] and setting.split("=")[0] in line[0]
    assert "Traceback" not in err
    assert not (run_dir / "stages" / f"{stage}.yaml").exists()
