"""`humpback`: the pipeline from a shell. The notebooks call the same functions.

    humpback run --preset demo --run-dir runs/demo [--until STAGE] [--redo STAGE] [--set train.max_steps=10]
    humpback run --config mine.yaml --run-dir runs/mine   # mine.yaml: `base: demo` and what it changes
    accelerate launch --multi_gpu --num_processes N -m humpback_nb.cli run ...   # N processes, one run
    humpback status --run-dir runs/demo
    humpback clear --run-dir runs/demo STAGE
    humpback config --preset demo --config mine.yaml --set train.max_steps=5   # the result, each value's source
    humpback plan --preset paper-7b-full --gpu h100 --gpus 8 [--json | --markdown]   # what a run costs
    humpback plan --preset paper-7b --calibrate runs/gpu-check/gpu_check.json --judge-price 30 60
    humpback gpu-check [--model NAME] [--engine vllm]   # the paper's preset shrunk to minutes: verdicts before a
                                                        # paid run (with vLLM's speed beside the kit's loops)
    humpback fetch                             # fetch and check every embedded default
    humpback export --run-dir runs/demo --model m2 --to m2-merged   # one merged model plain transformers loads
    humpback chat --run-dir runs/demo --model m2   # answers each line of stdin, as the evaluation answers
    humpback report --run-dir runs/demo        # one HTML page with every table and figure: runs/demo/report.html
    humpback notebooks --preset demo --run-dir runs/demo   # execute the notebooks with papermill
    humpback notebooks --run-dir runs/mine                 # ... on an existing run, with the run's own config
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from humpback_nb.config import ConfigError, HumpbackConfig, explain_config, presets, render_config
from humpback_nb.infra.files import RecordError
from humpback_nb.infra.guard import ComputeRefused, EngineError, JudgeError, ModelError
from humpback_nb.infra.sources import SourceError
from humpback_nb.pipeline import open_run
from humpback_nb.run import PipelineError, RunFiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="humpback", description="Humpback: instruction backtranslation, stage by stage."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the method's stages into a run folder (done stages are skipped)")
    _add_config_args(run)
    run.add_argument("--run-dir", required=True, type=Path)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--redo", metavar="STAGE", action="append", default=[], help="run this stage even if done")
    run.add_argument("--from", dest="start_from", metavar="RUN_DIR", type=Path,
                     help="start from another run: link every stage it has done with the same hashes (a follow-up "
                          "started from a Humpback run runs only its own stages)")

    status = commands.add_parser("status", help="which stages of a run folder are done")
    status.add_argument("--run-dir", required=True, type=Path)

    clear = commands.add_parser("clear", help="delete a stage's outputs; the stages after it become pending")
    clear.add_argument("--run-dir", required=True, type=Path)
    clear.add_argument("stage")

    show = commands.add_parser("config", help="print a config as YAML, each value with the layer it came from")
    _add_config_args(show)
    show.add_argument("--plain", action="store_true", help="plain YAML, without the comments")

    plan = commands.add_parser("plan", help="what a run costs, stage by stage, before it runs (no model is loaded)")
    _add_config_args(plan)
    plan.add_argument("--gpu", default="h100", help="the GPU to price the run on (a wrong name lists the known ones)")
    plan.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs the run splits over (wall clock)")
    plan.add_argument("--calibrate", type=Path, metavar="GPU_CHECK_JSON",
                      help="price with the times a `humpback gpu-check` report measured (its gpu_check.json)")
    plan.add_argument("--judge-price", type=_price, nargs=2, metavar=("PROMPT", "REPLY"),
                      help="the judge's price in US dollars per million prompt and reply tokens (e.g. 30 60)")
    plan.add_argument("--engine", metavar="{local,vllm}",
                      help="price generation and scoring as this engine runs them: the kit's own loops (local) or "
                           "vLLM's server (vllm); default: the config's engine.kind")
    output = plan.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the plan as JSON")
    output.add_argument("--markdown", action="store_true", help="print the plan as a Markdown table")

    check = commands.add_parser("gpu-check", help="the paper's preset shrunk to minutes on your GPU and base model: "
                                "EOS stop rates, the rater's parse rate, tokens/s, peak memory, a verdict per check")
    check.add_argument("--model", help="the base model (default: paper-7b's; without CUDA the embedded one)")
    check.add_argument("--run-dir", type=Path, default=Path("runs/gpu-check"))
    check.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override one setting")
    check.add_argument("--engine", choices=["local", "vllm"], default="local",
                       help="vllm: M0 also answers through vLLM's server, measured beside the kit's loops (for "
                            "`humpback plan --engine vllm --calibrate`)")

    commands.add_parser("fetch", help="fetch and check every embedded model and data set")

    report = commands.add_parser("report", help="write RUN_DIR/report.html: every table beside the paper's, every "
                                 "figure, the config, stage times and examples, in one self-contained page")
    report.add_argument("--run-dir", required=True, type=Path)

    notebooks = commands.add_parser("notebooks", help="execute the notebooks with papermill into RUN_DIR/notebooks "
                                    "(without --preset/--config/--set: the run's own config, else the demo preset)")
    _add_config_args(notebooks)
    notebooks.add_argument("--run-dir", required=True, type=Path)
    notebooks.add_argument("--quiet", action="store_true", help="do not show the cells' output as they run")
    notebooks.add_argument("--only", metavar="NN", action="append", help="only notebooks starting with NN")

    export = commands.add_parser("export", help="write a model of a run as one merged safetensors model that plain "
                                 "transformers loads (with the tokenizer and chat template it was trained with)")
    export.add_argument("--run-dir", required=True, type=Path)
    export.add_argument("--model", required=True, help="a model of the run: m2 (Humpback), m1, m0, backward, ...")
    export.add_argument("--to", required=True, type=Path, metavar="DIR", help="a new (or empty) folder")

    chat = commands.add_parser("chat", help="answer questions from stdin, one per line, with a model of a run")
    chat.add_argument("--run-dir", required=True, type=Path)
    chat.add_argument("--model", default="m2", help="a model of the run, or base (default: m2)")
    chat.add_argument("--tags", help="the system prompt: S_a, S_w, S_a+S_w or none (default: the run's "
                      "evaluate.inference_tags)")
    chat.add_argument("--max-new-tokens", type=int, metavar="N", help="default: the run's generate.max_new_tokens")

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, PipelineError, SourceError, RecordError, ModelError, ComputeRefused, JudgeError,
            EngineError) as err:
        print(f"humpback: error: {err}", file=sys.stderr)
        return 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """--preset, then --config, then --set: each layer over the one before (config.resolve_config)."""
    parser.add_argument("--preset", choices=presets(), help="a preset shipped with the kit (default: the one the "
                        "config file names with `base:`, else demo)")
    parser.add_argument("--config", type=Path, help="a config YAML laid over the preset: what it changes, and "
                        "optionally `base: PRESET`")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set train.max_steps=10 (value parsed as YAML)")


def _config(args: argparse.Namespace) -> HumpbackConfig:
    return explain_config(args.preset, args.config, _overrides(args.set))[0]


def _overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items as {key: value}, each value parsed as YAML."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 3e-4 (no dot) as a string
        overrides[key.strip()] = parsed
    return overrides


def _run(args: argparse.Namespace) -> int:
    from humpback_nb.infra.distributed import processes

    config = _config(args)
    folder = open_run(args.run_dir, config)
    folder.run(config, until=args.until, redo=args.redo, start_from=getattr(args, "start_from", None))
    if processes().is_main:
        print(f"run folder: {folder.path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    folder = open_run(args.run_dir)
    if not folder.files.path("config").is_file():
        print(f"{folder.path}: no run here yet (no {folder.files.path('config').name}); stages of the method:")
    else:
        config = folder.config()
        print(f"{folder.path}: preset {config.preset}, config hash {config.hash()}")
    for row in folder.status():
        took = f"{row['seconds']:.1f}s" if row["seconds"] is not None and row["state"] == "done" else ""
        state = f"{row['state']} ({row['reason']})" if row.get("reason") else row["state"]
        linked = f"[linked from {row['linked_from']}] " if row.get("linked_from") else ""
        print(f"  {row['stage']:<13} {state:<10} {took:>9}  {linked}{row['doc']}")
        for model in row["models"]:
            took = f"{model['seconds']:.1f}s" if model["seconds"] is not None and model["state"] == "done" else ""
            print(f"    model {model['model']:<22} {model['state']:<8} {took:>9}  {model['hash'] or ''}")
    return 0


def _clear(args: argparse.Namespace) -> int:
    folder = open_run(args.run_dir)
    if args.stage not in folder.stages:
        raise PipelineError(f"unknown stage {args.stage!r}; stages: {', '.join(folder.stages)}")
    with folder.lock():
        cleared = folder.clear(args.stage)
    print(f"cleared {args.stage}; now pending: {', '.join(cleared)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    config, sources = explain_config(args.preset, args.config, _overrides(args.set))
    print(render_config(config, None if args.plain else sources), end="")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from humpback_nb.plan import build_plan, render_markdown, render_text

    plan = build_plan(_config(args), gpu=args.gpu, gpus=args.gpus, calibrate=args.calibrate,
                      judge_price=tuple(args.judge_price) if args.judge_price else None, engine=args.engine)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(render_markdown(plan) if args.markdown else render_text(plan), end="")
    return 0


def _price(text: str) -> float:
    """A price: a number of dollars, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a price is at least 0, got {text}")
    return value


def _gpu_check(args: argparse.Namespace) -> int:
    from humpback_nb.gpucheck import main as gpu_check

    return gpu_check(args.run_dir, model=args.model, overrides=_overrides(args.set), engine=args.engine)


def _report(args: argparse.Namespace) -> int:
    from humpback_nb.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from humpback_nb.infra.models import EMBEDDED_MODELS, embedded_checkpoint
    from humpback_nb.infra.sources import fetch_all

    for name, path in fetch_all().items():
        print(f"{name:<22} {path}")
    for name in EMBEDDED_MODELS:
        print(f"{name:<22} {embedded_checkpoint(name)}")
    return 0


def _notebooks(args: argparse.Namespace) -> int:
    import json
    import time

    from humpback_nb.nb.notebooks import execute_all

    started = time.time()
    executed = execute_all(args.preset, args.run_dir, names=args.only, config_file=args.config,
                           overrides=_overrides(args.set), verbose=not args.quiet)
    minutes = (time.time() - started) / 60
    print(f"executed {len(executed)} notebook(s) in {minutes:.1f} min: {RunFiles(args.run_dir).path('notebooks')}")
    summary = RunFiles(args.run_dir).path("summary")
    if summary.is_file():
        from humpback_nb.report import main_result

        numbers = json.loads(summary.read_text())
        print(f"summary: {summary} (pipeline stages {numbers['pipeline_seconds'] / 60:.1f} min)")
        headline = main_result(numbers)  # with the judge's verdict: a win rate it cannot resolve is said to be noise
        if headline:
            print(headline)
    print(f"figures: {RunFiles(args.run_dir).path('figures')}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from humpback_nb.export import export

    export(args.run_dir, args.model, args.to)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from humpback_nb.export import chat

    chat(args.run_dir, args.model, tags=args.tags, max_new_tokens=args.max_new_tokens)
    return 0


_COMMANDS = {"run": _run, "status": _status, "clear": _clear, "config": _show, "plan": _plan, "gpu-check": _gpu_check,
             "fetch": _fetch, "report": _report,
             "notebooks": _notebooks, "export": _export, "chat": _chat}

if __name__ == "__main__":
    sys.exit(main())
