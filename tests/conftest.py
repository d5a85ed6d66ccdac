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

# The finished tiny run is made once per worker that asks for it (the notebooks, some 5 minutes), so the files whose
# tests read it all go to one worker; every other file goes to a worker whole, and its module fixtures are made once.
FINISHED_RUN = "the finished tiny run"
FINISHED_RUN_FIXTURES = {"executed_notebooks", "finished_tiny_run"}
FINISHED_RUN_FILES = {f"tests/{name}.py" for name in (
    "nb/test_notebooks", "nb/test_browser", "nb/test_variant_tables", "method/test_train", "test_vllm",
    "test_pipeline", "test_export", "test_report", "test_followups", "test_damage", "test_interop",
    "test_endpoint_rater")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler by scope, a scope being a file, or FINISHED_RUN for the FINISHED_RUN_FILES."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return FINISHED_RUN if path in FINISHED_RUN_FILES else path

    return ByFile(config, log)


def pytest_collection_modifyitems(config, items):
    """On a worker, a test outside FINISHED_RUN_FILES that reads the finished run is refused: it would make it again."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    outside = sorted({item.nodeid.split("::")[0] for item in items
                      if FINISHED_RUN_FIXTURES & set(getattr(item, "fixturenames", ()))} - FINISHED_RUN_FILES)
    if outside:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(outside)} to FINISHED_RUN_FILES (its tests read "
                                "the finished tiny run, which each worker would otherwise make again)")


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
