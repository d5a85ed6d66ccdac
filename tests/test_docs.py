"""The README and docs/*.md as a user reads them: every command they show, checked as written, and every relative link.

Shell blocks (```bash, ```sh, ```shell, ```console, and plain ``` blocks for their lines that start with `humpback ` or
`make `), and inline code spans in the prose that are `humpback` or `make` commands, are split into simple commands,
and each is checked:

* `humpback SUBCOMMAND --flag ...` (also `.venv/bin/humpback`, `python -m humpback_nb.cli`, `accelerate launch ... -m
  humpback_nb.cli`): the subcommand and every flag are ones the command's own parser knows, a `--preset` names a
  preset, and a `--set KEY=VALUE` names a setting of the config;
* `make TARGET ...`: every target is one of the Makefile's (`VAR=value` arguments allowed);
* `bash SCRIPT`, `python SCRIPT`: the script exists; `bash -c '...'` is checked as a command line of its own;
* any argument that names a file under one of the repository's own folders (tests/, benchmarks/, humpback_nb/, ...).

Generated pages (docs/plans/, docs/measured/) are left out. The checks read the parser object itself (no process is
started), so the whole file runs in about a second.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/plans/, docs/measured/: generated
README_MAX_LINES = 250

SHELL = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
REPO_DIRS = ("benchmarks/", "docs/", "humpback_nb/", "notebooks/", "tests/", "figures/", "data/")


# -- what the commands are checked against -----------------------------------------------------------------------
@functools.cache
def humpback_parser() -> argparse.ArgumentParser:
    """The `humpback` parser as humpback_nb.cli.main builds it, caught at its parse_args (nothing runs)."""
    from humpback_nb import cli

    class Built(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Built(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            cli.main(["--help"])
        except Built as built:
            return built.args[0]
    raise AssertionError("humpback_nb.cli.main built no parser")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subcommands on this action, with no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@functools.cache
def config_keys() -> frozenset[str]:
    """Every dotted setting `--set` may name: `train.max_steps`, `random_seed`, ..."""
    from humpback_nb.config import HumpbackConfig

    keys = set()
    for name, value in HumpbackConfig().to_dict().items():
        keys.add(name)
        if isinstance(value, dict):
            keys.update(f"{name}.{key}" for key in value)
    return frozenset(keys)


@functools.cache
def make_targets(makefile: Path = ROOT / "Makefile") -> frozenset[str]:
    return frozenset(re.findall(r"^([A-Za-z][\w.-]*)[ \t]*:(?!=)", makefile.read_text(), re.M))


# -- finding the commands -----------------------------------------------------------------------------------------
def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of every shell command in a page's code blocks; continuations joined."""
    found = []
    for block in FENCE.finditer(text):
        lang, indent = block["lang"].lower(), len(block["indent"])
        first = text.count("\n", 0, block.start("body")) + 1
        body = [line[indent:] if line[:indent].isspace() else line for line in block["body"].splitlines()]
        joined, start = "", None
        for number, line in enumerate(body, first):
            if line.startswith("$ "):
                line = line[2:]
            if start is None:
                start = number
            joined += line
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            if lang in SHELL or (not lang and re.match(r"(humpback|make)( |$)", joined)):
                found.append((start, joined))
            joined, start = "", None
    return found


def inline_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every inline code span in the prose that is a `humpback` or `make` command."""
    prose = FENCE.sub(lambda block: "\n" * block[0].count("\n"), text)
    return [(prose.count("\n", 0, span.start()) + 1, " ".join(span[1].split()))
            for span in re.finditer(r"`((?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?(?:humpback|make) [^`]*)`", prose)]


def simple_commands(line: str) -> list[list[str]]:
    """A command line cut into simple commands at ;, &&, ||, | and parentheses; comments dropped. Inside a usage
    pattern's brackets (`[--json | --markdown]`) a | is an alternative, not a pipe."""
    line = re.sub(r"\[[^\]]*\]", lambda m: m[0].replace("|", " "), line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError as err:  # an unclosed quote
        return [["<unparsable>", f"{line!r}: {err}"]]
    commands, current = [], []
    for token in tokens:
        if token and set(token) <= set(";&|()<>"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


# -- checking them ------------------------------------------------------------------------------------------------
def check_humpback(args: list[str]) -> list[str]:
    parser = humpback_parser()
    names = subcommands(parser)
    words = [a.strip("[]'\"") for a in args]
    if not words or words[0] in ("-h", "--help"):
        return []
    sub = words[0]
    if sub not in names:
        return [f"`humpback {sub}`: no such subcommand (humpback knows {', '.join(names)})"]
    known, problems = options(names[sub]), []
    for at, word in enumerate(words[1:], 1):
        if not re.match(r"--?[A-Za-z]", word):
            continue
        flag, _, inline = word.partition("=")
        if flag not in known:
            problems.append(f"`humpback {sub} {flag}`: no such flag (it knows {', '.join(sorted(known))})")
            continue
        value = inline or (words[at + 1] if at + 1 < len(words) else "")
        action = known[flag]
        if action.choices and re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value) and value not in action.choices:
            problems.append(f"`humpback {sub} {flag} {value}`: not one of {', '.join(map(str, action.choices))}")
        if flag == "--set" and "=" in value:
            key = value.partition("=")[0]
            if re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key) and key not in config_keys():
                problems.append(f"`humpback {sub} --set {key}=...`: no such setting in the config")
    return problems


def check_make(args: list[str]) -> list[str]:
    targets = [a for a in args if not ASSIGNMENT.match(a) and not a.startswith("-") and a != "..."]
    return [f"`make {t}`: no such target in the Makefile (it has {', '.join(sorted(make_targets()))})"
            for t in targets if t not in make_targets()]


def check_paths(words: list[str]) -> list[str]:
    """Arguments that name a file in one of the repository's own folders must exist."""
    problems = []
    for word in words:
        path = word.partition("=")[2] if word.startswith("-") else word
        path = path.strip("[]'\"")
        if path.startswith(REPO_DIRS) and not any(c in path for c in "<>*$") and not (ROOT / path).exists():
            problems.append(f"`{path}`: no such file or folder in the repository")
    return problems


WRAPPERS = {"srun", "sudo", "time", "env", "nohup", "exec", "xargs"}  # run the command that follows them


def check_command(words: list[str]) -> list[str]:
    while words and (ASSIGNMENT.match(words[0]) or words[0] in WRAPPERS):  # HUMPBACK_NO_COMPUTE=1 make lab
        words = words[1:]
        while words and words[0].startswith("-"):  # a wrapper's own options
            words = words[1:]
    if not words:
        return []
    if words[0] == "<unparsable>":
        return [f"cannot split {words[1]}"]
    program, args = words[0].rpartition("/")[2], words[1:]
    if "-m" in args and args[args.index("-m") + 1:args.index("-m") + 2] == ["humpback_nb.cli"]:
        # python -m humpback_nb.cli ..., accelerate launch ... -m humpback_nb.cli ...
        return check_paths(args) + check_humpback(args[args.index("-m") + 2:])
    if program == "humpback":
        return check_paths(args) + check_humpback(args)
    if program == "make":
        return check_make(args)
    if program in ("bash", "sh") and args[:1] == ["-c"]:
        return [p for line in args[1:2] for c in simple_commands(line) for p in check_command(c)]
    if program in ("bash", "sh") or (re.fullmatch(r"python(3(\.\d+)?)?", program) and args[:1] != ["-m"]):
        at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if at is not None and not (ROOT / args[at]).is_file():
            return [f"`{program} {args[at]}`: no such script"] + check_paths(args[at + 1:])
    return check_paths(args)


def command_problems(text: str, page: str) -> list[str]:
    return [f"{page}:{number}: {problem}" for number, line in [*shell_lines(text), *inline_lines(text)]
            for words in simple_commands(line) for problem in check_command(words)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", text, re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def link_problems(text: str, page: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:[ \t]+\"[^\"]*\")?\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{page.name}: link to {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{page.name}: link to {target}: no heading '#{anchor}' in {path or page.name}")
    return problems


# -- the tests ----------------------------------------------------------------------------------------------------
def test_readme_is_a_short_map():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): depth goes to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_is_known(page):
    problems = command_problems(page.read_text(), str(page.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    problems = link_problems(page.read_text(), page)
    assert not problems, "\n".join(problems)


def test_the_commands_are_found():
    """The checks above see the commands: the README's own `make` and `humpback` lines among them."""
    words = [w for page in PAGES for _, line in shell_lines(page.read_text()) for c in simple_commands(line)
             for w in c[:1]]
    assert words.count("humpback") >= 20 and words.count("make") >= 5, words
    assert "notebooks" in subcommands(humpback_parser()) and {"demo", "test", "bench"} <= make_targets()


def test_a_wrong_command_is_reported():
    page = """
```bash
humpback frobnicate --run-dir runs/x      # no such subcommand
humpback run --preset demo --run-dir runs/x --no-such-flag
humpback run --preset paper-13b --run-dir runs/x
.venv/bin/humpback run --run-dir runs/x --set train.no_such_setting=1
HUMPBACK_NO_COMPUTE=1 make lab \\
    no-such-target
bash benchmarks/no_such_script.sh && python benchmarks/no_such.py
.venv/bin/accelerate launch --num_processes 2 -m humpback_nb.cli statsu --run-dir runs/x
srun bash -c 'make PYTHON=python3.11 demo nonsense'
humpback notebooks --config tests/no_such.yaml --run-dir runs/x
```

```
make demo
humpback status --run-dri runs/x
```

In prose, `humpback run --run-dir runs/x --preset demo --set
curate.no_such=1` and `make lab` are commands too.

```bash
humpback run --preset demo --run-dir runs/ok [--until STAGE] [--set KEY=VALUE]   # placeholders are fine
humpback plan --preset paper-7b [--json | --markdown]
make PYTHON=python3.11 demo
```
"""
    problems = "\n".join(command_problems(page, "made-up.md"))
    for wrong in ("humpback frobnicate", "--no-such-flag", "paper-13b", "train.no_such_setting", "make no-such-target",
                  "bash benchmarks/no_such_script.sh", "python benchmarks/no_such.py", "humpback statsu",
                  "make nonsense", "tests/no_such.yaml", "--run-dri",
                  "made-up.md:20: `humpback run --set curate.no_such"):  # an inline span over two lines
        assert wrong in problems, f"{wrong!r} was not reported:\n{problems}"
    assert len(problems.splitlines()) == 12, problems
    links = link_problems("[a](docs/no-such-page.md) [b](README.md#no-such-heading) [c](https://example.org) "
                          "[d](docs/gpu.md#past-one-machine-many-processes-many-gpus)", ROOT / "README.md")
    assert len(links) == 2 and "no-such-page" in links[0] and "no-such-heading" in links[1], links
