"""vLLM servers for the vllm engine: the kit's own, or the ones a user runs (`engine.urls`).

The kit's own server runs vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, from the
environment at `engine.python`: vLLM pins its own torch and transformers) on the base model, served as "base", with
LoRA enabled and adapters loaded at run time (`/v1/load_lora_adapter`): the run's M_yx, M0, M1, ... are added as the
stages need them, under names that carry their weights' digest. A model trained with all its weights
(`train.method: full`) is served from its own folder instead, one at a time. The server's output goes to a log in
the run folder; the kit waits for `/health` and stops the server when a stage trains (the GPU is the trainer's
then), when the run ends, or when the kit's process goes (Linux: the server is told to stop when its parent dies).

Servers a user runs are asked for their models (`/v1/models`): the one without a parent is the base; the run's
adapters are loaded into each of them from the run folder, which they must see at the same path.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from humpback_nb.config import EngineConfig
from humpback_nb.infra.guard import EngineError
from humpback_nb.infra.http import Retry, get_ok, post_json

LOG_TAIL = 300  # characters of the server's log quoted when it fails
# The kit's server samples from this seed (vLLM's CPU build refuses a seed per request: engine.request_seeds). vLLM's
# sampling repeats only where the batches repeat, as its own docs say; the kit's loops seed each batch.
SERVER_SEED = 0


def adapter_name(name: str, folder: Path) -> str:
    """The name a LoRA adapter is served under: the kit's name and the first digits of its weights' sha256, so that
    two runs' "m0" on one server stay apart and a retrained model is never read as the old one."""
    digest = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:10]
    return f"{name}-{digest}"


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def repository_root() -> Path:
    return Path(__file__).resolve().parents[2]


def server_python(settings: EngineConfig) -> str:
    """engine.python: as written when it exists from here, else relative to the kit's folder (notebooks run in
    notebooks/, the environment is at the top)."""
    path = Path(settings.python).expanduser()
    for candidate in (path, repository_root() / path):  # the second is the first when it is absolute
        if candidate.is_file():
            return str(candidate)
    raise EngineError(f"engine.python {settings.python} does not exist: make the vLLM environment (`make vllm`) or "
                      "point engine.python at a Python that has vLLM, or name running servers in engine.urls")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Server:
    """One vLLM server the kit started: `model` (a folder) served as `served`, at http://127.0.0.1:port/v1."""

    settings: EngineConfig
    model: Path
    served: str
    log: Path
    dtype: str
    seed: int
    lora_rank: int | None  # LoRA enabled, adapters of at most this rank
    args: list[str] = field(default_factory=list)  # the kit's own (quantization)
    process: subprocess.Popen | None = None
    adapters: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}/v1"

    def command(self) -> list[str]:
        """No --max-model-len: the model's own, as the kit's loops read any prompt the model can (prompts are fitted
        to model.context_length, but a preset may set it below the rating prompt's rubric, as tiny does)."""
        command = [server_python(self.settings), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                   "--served-model-name", self.served, "--dtype", self.dtype, "--host", "127.0.0.1",
                   "--port", str(self.settings.port),
                   "--seed", str(self.seed), "--disable-log-stats"]
        if self.lora_rank is not None:
            command += ["--enable-lora", "--max-lora-rank", str(self.lora_rank)]
        if sys.platform == "linux" and not _has_cuda():  # vLLM's CPU build: no graphs to capture
            command.append("--enforce-eager")
        return command + self.args + list(self.settings.args)

    def start(self) -> Server:
        if get_ok(f"http://127.0.0.1:{self.settings.port}/health"):
            raise EngineError(f"something already answers on 127.0.0.1:{self.settings.port} (engine.port): stop it, "
                              "choose another engine.port, or name it in engine.urls")
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   VLLM_CPU_KVCACHE_SPACE=str(self.settings.kv_cache_gib))
        if not _has_cuda():  # a CPU: the engine in the server's own process, which starts 7 s sooner (of ~24 s on
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # 2 cores) and has no cores to overlap it on
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            log.write(f"\n== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self.command())}\n".encode())
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True,  # its own group
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.time() + self.settings.start_timeout
        while not get_ok(f"http://127.0.0.1:{self.settings.port}/health"):
            if self.process.poll() is not None:
                raise EngineError(f"the vLLM server exited with code {self.process.returncode} before it answered: "
                                  f"{self.tail()} (its log: {self.log})")
            if time.time() > deadline:
                self.stop()
                raise EngineError(f"the vLLM server did not answer within {self.settings.start_timeout:g} s "
                                  f"(engine.start_timeout); its log: {self.log}")
            time.sleep(0.5)
        return self

    def gone(self) -> str | None:
        """Why the server no longer answers (it exited), or None while it runs."""
        if self.process is None or self.process.poll() is None:
            return None
        return (f"the vLLM server (pid {self.process.pid}) exited with code {self.process.returncode} during the "
                f"stage; rerun to resume from what was kept (its log: {self.log})")

    def tail(self) -> str:
        """The last error line of this start's log (else its last line)."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        lines = [line.strip() for line in text.rsplit("\n== ", 1)[-1].splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"(Error|error)[:,]", line)]
        return ((errors or lines or ["(no output)"])[-1])[-LOG_TAIL:]

    def stop(self) -> None:
        """Stop the server and the processes it started (its engine core, its workers): SIGTERM to its process
        group, SIGKILL after a few seconds (vLLM's own shutdown waits for its workers longer than a stage should)."""
        if self.process is not None:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, sig)
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def load_adapter(url: str, name: str, folder: Path, settings: EngineConfig) -> None:
    """Load a LoRA adapter into a running server (vLLM's runtime loading); one already loaded is left as it is."""
    try:
        post_json(url.rstrip("/") + "/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())},
                  timeout=settings.request_timeout, retry=Retry(tries=3, backoff=1.0, max_wait=10.0),
                  error=EngineError, what=f"vLLM server {url}", reply="text")
    except EngineError as err:
        if "already" not in str(err):  # "The lora adapter '...' has already been loaded."
            raise EngineError(f"{err} (a server you run needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora; "
                              f"it must see {folder.resolve()})") from None


def served_models(url: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The models a server serves (`/v1/models`)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout) as response:
            return json.loads(response.read())["data"]
    except (OSError, ValueError, KeyError) as err:
        raise EngineError(f"the vLLM server at {url} (engine.urls) does not answer: {type(err).__name__}: "
                          f"{err}") from None


def open_vllm(settings: EngineConfig, model_config, name: str, folder: Path | None, log: Path, tokenizer):
    """A VLLMEngine for model `name` (its folder, None for the base): at the servers of `engine.urls`, its adapter
    loaded into each; else at the kit's own server, started as needed."""
    from humpback_nb.infra.engines import VLLMEngine
    from humpback_nb.infra.models import resolve, runtime

    adapter = folder is not None and is_adapter(folder)
    if settings.urls:
        if folder is not None and not adapter:
            raise EngineError(f"model {name} has all its weights (train.method full): servers you run (engine.urls) "
                              "serve the base and the run's LoRA adapters only; leave engine.urls empty to let the "
                              "kit serve it")
        served = adapter_name(name, folder) if adapter else None
        for url in settings.urls:
            if served:
                load_adapter(url, served, folder, settings)
        if not served:
            roots = [m["id"] for m in served_models(settings.urls[0]) if not m.get("parent")]
            served = roots[0] if roots else "base"
        return VLLMEngine(settings.urls, served, tokenizer, settings)
    base = Path(resolve(model_config.name))
    start = partial(server_for, settings, base, folder, log, str(runtime(model_config.device, model_config.dtype).dtype)
                    .removeprefix("torch."), SERVER_SEED, settings.max_lora_rank,
                    quantization_args(model_config))
    kit = KitServed(start, adapter_name(name, folder) if adapter else None, folder)
    kit.url()
    return VLLMEngine([], kit.adapter or kit.server.served, tokenizer, settings, server=kit)


class KitServed:
    """A model at the kit's own server, for VLLMEngine: `url()` makes sure the server serves it (started again after
    a stage trained, the adapter loaded), `gone()` says why it stopped (None while it runs)."""

    def __init__(self, start, adapter: str | None, folder: Path | None):
        self.start, self.adapter, self.folder, self.server = start, adapter, folder, None
        self.lock = threading.Lock()  # requests go out from several threads

    def url(self) -> str:
        with self.lock:
            if self.server is not None and (why := self.server.gone()):
                raise EngineError(why)  # it died under this stage: the stage stops, its rerun resumes
            self.server = self.start()
            if self.adapter and self.adapter not in self.server.adapters:
                load_adapter(self.server.url, self.adapter, self.folder, self.server.settings)
                self.server.adapters.add(self.adapter)
            return self.server.url

    def gone(self) -> str | None:
        return self.server.gone() if self.server is not None else None


def quantization_args(model_config) -> list[str]:
    """A 4-bit base (QLoRA) is served in 4 bits where vLLM has the kernels (bitsandbytes, on a GPU); on a CPU, vLLM's
    build has none, and the base is served in bf16 (the adapters then sit on the unquantized weights)."""
    return ["--quantization", "bitsandbytes"] if model_config.quantization == "4bit" and _has_cuda() else []


def check_ready(settings: EngineConfig) -> None:
    """Before a run starts: the servers of engine.urls answer, or the kit's own can be started (engine.python)."""
    if settings.kind != "vllm":
        return
    for url in settings.urls:
        served_models(url)
    if not settings.urls:
        server_python(settings)


# -- the servers of this process --------------------------------------------------------------------------------
_server: Server | None = None


def server_for(settings: EngineConfig, base: Path, model: Path | None, log: Path, dtype: str, seed: int,
               lora_rank: int | None, args: list[str]) -> Server:
    """The kit's running server that serves `model` (a folder of full weights) or the base with LoRA (model None or an
    adapter), started (or started anew, if it serves something else) as needed."""
    global _server
    wanted = base if model is None or is_adapter(model) else model
    served = "base" if wanted == base else model.name
    rank = lora_rank if wanted == base else None
    if _server is not None and (_server.model, _server.served, _server.process is not None) == (wanted, served, True) \
            and _server.gone() is None:
        return _server
    stop()
    _server = Server(settings, wanted, served, log, dtype, seed, rank, args).start()
    return _server


def current() -> Server | None:
    return _server


def before_training() -> None:
    """A stage is about to train: on a GPU, the kit's server gives it the memory it holds (started again when the
    next stage needs it). On a CPU it stays up: memory is not short there, and a start costs half a minute."""
    if _server is not None and _has_cuda():
        stop()


def stop() -> None:
    """Stop the kit's server, if one runs (before training on a GPU, at the end of a run, when the process ends)."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None


atexit.register(stop)
