"""Errors about models and endpoints, importable without torch (the CLI catches them; `humpback status` loads no
torch), and a switch that proves a finished run is only read: with HUMPBACK_NO_COMPUTE=1 in the environment,
training a model and generating from one raise instead of running. The workshop test executes every notebook on
a finished run this way; a teacher can set it too, to be sure a class computes nothing."""

from __future__ import annotations

import os

NO_COMPUTE = "HUMPBACK_NO_COMPUTE"


class ModelError(RuntimeError):
    """A model or adapter that cannot be loaded; the message says which and why."""


class JudgeError(RuntimeError):
    """An endpoint (a judge or the rater) refused the request, or failed every try; the message says which."""


class EngineError(RuntimeError):
    """An inference engine that cannot serve: a vLLM server that does not start, answer or stay up."""


class ComputeRefused(RuntimeError):
    """Training or generation was asked for while HUMPBACK_NO_COMPUTE=1."""


def refuse_compute(what: str) -> None:
    """Raise ComputeRefused if HUMPBACK_NO_COMPUTE=1; `what` names the work ("training m2", "generation")."""
    if os.environ.get(NO_COMPUTE, "") == "1":
        raise ComputeRefused(f"{what} asked for while {NO_COMPUTE}=1: this run should only be read")
