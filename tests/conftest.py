"""Shared test set-up: nothing may reach a model or data hub, and models load once per session."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

# The finished tiny run is made once per worker that asks for it (the notebooks, some 5 minutes), so the tests that
# read it all go to one worker: the files below whole, and the tests named in the others. Every other file goes to a
# worker whole, and its module fixtures are made once.
FINISHED_RUN = "the finished tiny run"
FINISHED_RUN_FIXTURES = {"executed_notebooks", "finished_tiny_run"}
FINISHED_RUN_TESTS = (
    "tests/nb/test_browser.py", "tests/test_export.py", "tests/test_report.py", "tests/test_followups.py",
    "tests/test_interop.py", "tests/test_endpoint_rater.py",
    "tests/test_vllm.py::test_greedy_instructions_agree_with_the_local_engine_or_part_at_a_near_tie",
    "tests/test_vllm.py::test_the_logprob_rater_agrees_within_the_bound_its_log_probabilities_give",
    "tests/test_vllm.py::test_answers_stop_where_the_local_engine_stops",
    "tests/test_vllm.py::test_the_tiny_pipeline_runs_on_vllm_and_a_killed_server_costs_only_the_unfinished_batches",
    "tests/nb/test_notebooks.py::test_notebook_runs_on_the_tiny_preset",
    "tests/nb/test_notebooks.py::test_on_a_finished_run_every_notebook_only_reads",
    "tests/nb/test_notebooks.py::test_the_switch_reaches_the_notebook_kernel",
    "tests/nb/test_notebooks.py::test_after_a_change_of_learning_rate_every_model_is_trained_again",
    "tests/nb/test_variant_tables.py::test_a_report_of_a_finished_run_with_a_follow_up_beside_it",
    "tests/method/test_train.py::test_a_models_hash_leaves_out_where_training_is_reported",
    "tests/test_damage.py::test_status_names_a_cut_candidates_file_of_the_tiny_run",
    "tests/test_pipeline.py::test_a_third_iteration_trains_m3_and_leaves_the_paper_s_stages_as_they_are",
)


def _reads_the_finished_run(nodeid: str) -> bool:
    """True for a test FINISHED_RUN_TESTS names: its file, or its name (any of its parameters)."""
    test = nodeid.split("[")[0]
    return any(test == named or test.startswith(named + "::") for named in FINISHED_RUN_TESTS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler by scope: FINISHED_RUN for the tests that read it, else the test's file."""
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return FINISHED_RUN if _reads_the_finished_run(nodeid) else nodeid.split("::")[0]

    return ByScope(config, log)


def pytest_collection_modifyitems(config, items):
    """On a worker, a test that reads the finished run without being in FINISHED_RUN_TESTS is refused: it would run
    on a worker that makes the run again."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    unnamed = sorted(item.nodeid.split("[")[0] for item in items if not _reads_the_finished_run(item.nodeid)
                     and FINISHED_RUN_FIXTURES & set(getattr(item, "fixturenames", ())))
    if unnamed:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(dict.fromkeys(unnamed))} to FINISHED_RUN_TESTS "
                                "(it reads the finished tiny run, which another worker would make again)")


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
    runs them: each finds the stages of the notebooks before it done and runs only its own. Made once per session:
    (run folder, {notebook stem: the executed notebook, or the error papermill raised})."""
    from humpback_nb.nb.notebooks import execute, notebook_paths

    root = tmp_path_factory.mktemp("notebooks")
    run_dir, executed = root / "run", {}
    for path in notebook_paths():
        try:
            executed[path.stem] = execute(path, root / "executed" / path.name, {
                "preset": "tiny", "run_dir": str(run_dir), "figures_dir": str(root / "figures")})
        except Exception as err:  # a cell failed: that notebook's test reports it, the next ones still run
            executed[path.stem] = err
    return run_dir, executed


@pytest.fixture(scope="session")
def finished_tiny_run(executed_notebooks):
    """A run folder with every stage of the `tiny` preset done: the one the notebooks filled (finished here if a
    notebook failed midway). Shared: a test that changes a run copies it first (shutil.copytree)."""
    from humpback_nb.config import load_preset
    from humpback_nb.pipeline import run
    from humpback_nb.run import RunFiles

    path = executed_notebooks[0]
    if not RunFiles(path).path("summary").is_file():
        run(load_preset("tiny"), path)
    return path
