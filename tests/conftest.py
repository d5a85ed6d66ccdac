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
