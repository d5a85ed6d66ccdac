"""Shared test set-up: nothing may reach a model or data hub, and models load once per session."""

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The kit's defaults are local; a test that tried the hub would fail here rather than hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the tests on two workers (pytest-xdist), each with its share of the cores (which the processes
# it starts inherit): two workers each using every core would slow both, their threads waiting on each other at
# every operation.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# The finished tiny run is made once per test run (the notebooks, some 8 minutes), by the first worker that asks for
# it; a worker that asks meanwhile waits for it, and shares it after. The tests that work in it in place (running its
# stages, or writing beside it) all go to one worker, in one scope with the notebooks that make it, which starts first.
# The tests that only copy or read it go, a file at a time, to whichever worker asks once it is made. Every other file
# goes to a worker whole, and its module fixtures are made once.
FINISHED_RUN = "the finished tiny run"
AFTER_THE_RUN = "after the finished tiny run: "
FINISHED_RUN_FIXTURES = {"executed_notebooks", "finished_tiny_run"}
FINISHED_RUN_TESTS = (
    "tests/test_export.py", "tests/test_followups.py", "tests/test_interop.py",
    "tests/nb/test_notebooks.py::test_notebook_runs_on_the_tiny_preset",
    "tests/nb/test_notebooks.py::test_on_a_finished_run_every_notebook_only_reads",
    "tests/nb/test_notebooks.py::test_the_switch_reaches_the_notebook_kernel",
    "tests/method/test_train.py::test_a_models_hash_leaves_out_where_training_is_reported",
)
COPY_OR_READ_THE_FINISHED_RUN = (
    "tests/nb/test_notebooks.py::test_after_a_change_of_learning_rate_every_model_is_trained_again",
    "tests/test_vllm.py::test_the_tiny_pipeline_runs_on_vllm_and_a_killed_server_costs_only_the_unfinished_batches",
    "tests/test_vllm.py::test_greedy_instructions_agree_with_the_local_engine_or_part_at_a_near_tie",
    "tests/test_vllm.py::test_the_logprob_rater_agrees_within_the_bound_its_log_probabilities_give",
    "tests/test_vllm.py::test_answers_stop_where_the_local_engine_stops",
    "tests/nb/test_browser.py", "tests/test_report.py",
    "tests/test_pipeline.py::test_a_third_iteration_trains_m3_and_leaves_the_paper_s_stages_as_they_are",
    "tests/test_endpoint_rater.py::test_an_endpoint_rater_curates_a_k_concurrently_resumably_and_passes_the_raters_check",
    "tests/nb/test_variant_tables.py::test_a_report_of_a_finished_run_with_a_follow_up_beside_it",
    "tests/test_damage.py::test_status_names_a_cut_candidates_file_of_the_tiny_run",
)
# The scopes that took a minute or more (`pytest -n 2 --durations=0` on the 2-core AMD EPYC: 322, 261, 206, 194, 106,
# 74 and 73 s), longest first: they start first, so that what is left when one worker runs out of work is short.
LONGEST = (AFTER_THE_RUN + "tests/test_vllm.py", "tests/test_reliability.py", "tests/test_distributed.py",
           AFTER_THE_RUN + "tests/nb/test_notebooks.py", "tests/test_fsdp.py", "tests/test_gpu_check.py",
           AFTER_THE_RUN + "tests/nb/test_browser.py")


def _named(nodeid: str, names: tuple[str, ...]) -> bool:
    """True for a test `names` names: its file, or its name (any of its parameters)."""
    test = nodeid.split("[")[0]
    return any(test == named or test.startswith(named + "::") for named in names)


def _made(root: Path) -> Path:
    """The file that says the finished tiny run is made, in the folder every worker of a test run shares."""
    return root / "finished-tiny-run" / "executed.json"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler by scope (FINISHED_RUN, the file after AFTER_THE_RUN, or the test's file), which
    hands a worker the first scope in the order FINISHED_RUN, LONGEST, the rest (most tests first, as xdist orders
    them) that it can start now: a scope after the run once the run is made."""
    from xdist.scheduler import LoadScopeScheduling

    made = _made(config._tmp_path_factory.getbasetemp())  # the workers' base folders are under it (as xdist makes them)
    order = (FINISHED_RUN, *LONGEST)

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if _named(nodeid, FINISHED_RUN_TESTS):
                return FINISHED_RUN
            return (AFTER_THE_RUN if _named(nodeid, COPY_OR_READ_THE_FINISHED_RUN) else "") + nodeid.split("::")[0]

        def _assign_work_unit(self, node) -> None:
            queue = sorted(self.workqueue, key=lambda s: order.index(s) if s in order else len(order))
            ready = made.is_file()
            first = next((s for s in queue if ready or not s.startswith(AFTER_THE_RUN)), queue[0])
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            # A worker holds back its last test until it knows the next (for fixtures' teardown): it gets a new scope
            # when one test is left in hand, not xdist's two. So a scope waits behind one test, not behind two, and
            # a worker with scopes of one test does not take two of them at once.
            if self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) == 2:
                return
            super()._reschedule(node)

    return ByScope(config, log)


def pytest_collection_modifyitems(config, items):
    """On a worker, a test that uses the finished run without being named in FINISHED_RUN_TESTS or
    COPY_OR_READ_THE_FINISHED_RUN is refused: it could start before the run is made, and wait for it idle."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    unnamed = sorted(item.nodeid.split("[")[0] for item in items
                     if not _named(item.nodeid, FINISHED_RUN_TESTS + COPY_OR_READ_THE_FINISHED_RUN)
                     and FINISHED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())))
    if unnamed:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(dict.fromkeys(unnamed))} to FINISHED_RUN_TESTS "
                                "if it works in the finished tiny run in place, else to COPY_OR_READ_THE_FINISHED_RUN")


@pytest.fixture(scope="session")
def embedded_checkpoint():
    """The embedded model converted to safetensors (fetched and converted on first use)."""
    from humpback_nb.infra.models import embedded_checkpoint

    return embedded_checkpoint("smollm2-135m")


def send_json(handler: BaseHTTPRequestHandler, body, status: int = 200, headers: dict | None = None) -> None:
    """Answer a request to a loopback endpoint with `body` as JSON."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def chat_reply(content: str) -> dict:
    """The body of an OpenAI-compatible chat completion that says `content`."""
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def loopback():
    """Start local stand-ins for an OpenAI-compatible endpoint: loopback(respond) -> its base URL, where
    respond(handler) answers every POST. They stop when the test ends."""
    servers = []

    def start(respond) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                respond(self)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory, embedded_checkpoint):
    """Every notebook executed by papermill, in order, on one new run folder with the `tiny` preset, as `make demo`
    runs them: each finds the stages of the notebooks before it done and runs only its own; then the run finished,
    if a notebook failed midway. Made once per test run, by the first worker that asks (the others wait, then read
    what it made): (run folder, {notebook stem: the executed notebook, or the error papermill raised})."""
    from humpback_nb.config import load_preset
    from humpback_nb.infra.files import atomic_write_text, exclusive
    from humpback_nb.nb.notebooks import execute, notebook_paths
    from humpback_nb.pipeline import run
    from humpback_nb.run import RunFiles

    base = tmp_path_factory.getbasetemp()
    made = _made(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)  # shared by the workers
    root, run_dir = made.parent, made.parent / "run"
    with exclusive(root.with_name("finished-tiny-run.lock")):
        if not made.is_file():  # nobody made it, or a worker died making it
            shutil.rmtree(root, ignore_errors=True)
            executed = {}
            for path in notebook_paths():
                try:
                    executed[path.stem] = str(execute(path, root / "executed" / path.name, {
                        "preset": "tiny", "run_dir": str(run_dir), "figures_dir": str(root / "figures")}))
                except Exception as err:  # a cell failed: that notebook's test reports it, the next ones still run
                    executed[path.stem] = {"error": f"{type(err).__name__}: {err}"}
            if not RunFiles(run_dir).path("summary").is_file():
                run(load_preset("tiny"), run_dir)
            atomic_write_text(made, json.dumps(executed))
    executed = json.loads(made.read_text())
    return run_dir, {stem: RuntimeError(out["error"]) if isinstance(out, dict) else Path(out)
                     for stem, out in executed.items()}


@pytest.fixture(scope="session")
def finished_tiny_run(executed_notebooks):
    """A run folder with every stage of the `tiny` preset done: the one the notebooks filled. Shared by every test
    and both workers: a test that changes a run copies it first (shutil.copytree)."""
    return executed_notebooks[0]
