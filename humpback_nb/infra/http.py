"""The kit's one HTTP client for OpenAI-compatible servers: the endpoint judge, the endpoint rater and the vLLM engine.

`post_json` sends one JSON request and tries it again after failures worth another try: rate limits (429), server
errors (5xx, 408), timeouts and refused or dropped connections, at most `Retry.tries` times in all, after waits that
double from `backoff` seconds with jitter, or as long as the server's Retry-After asks; no wait is longer than
`max_wait`. Any other error status fails at once. Errors are one line (`error(message)`, the caller's class), naming
the URL; replies are parsed as JSON, never run.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Transient(Exception):
    """A failure worth another try: a rate limit, a server error, a timeout or a dropped connection."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait  # the seconds the server asked for (Retry-After), if it did


@dataclass
class Retry:
    """How often and how long to try a request again."""

    tries: int = 6
    backoff: float = 2.0
    max_wait: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def wait(self, tries: int, err: Transient) -> None:
        wait = err.wait if err.wait is not None else self.backoff * 2 ** (tries - 1) * random.uniform(0.5, 1)
        self.sleep(min(wait, self.max_wait))


def post_json(url: str, body: dict[str, Any], *, timeout: float, retry: Retry, error: type[Exception],
              what: str = "", key_env: str | None = None, reply: str = "json") -> Any:
    """The JSON reply (`reply="text"`: the text) to `body` POSTed at `url`, tried again after transient failures
    (`retry`); `error(message)` is raised, one line naming `what` (the server), when the request is refused or every
    try failed."""
    what = what or url
    for tries in range(1, retry.tries + 1):
        try:
            payload = _post(url, body, timeout, error, what, key_env)
            if reply == "text":
                return payload.decode("utf-8", "replace")
            try:
                return json.loads(payload)
            except ValueError:
                raise error(f"{what} sent no JSON: {one_line(payload.decode('utf-8', 'replace'))}") from None
        except Transient as err:
            if tries >= retry.tries:
                raise error(f"{what} failed {tries} tries; the last: {err}") from None
            retry.wait(tries, err)
    raise error(f"{what}: tries is {retry.tries}, at least 1 is needed")


def _post(url: str, body: dict[str, Any], timeout: float, error: type[Exception], what: str,
          key_env: str | None) -> bytes:
    headers = {"Content-Type": "application/json"}
    if key_env is not None:
        headers["Authorization"] = f"Bearer {os.environ.get(key_env, '')}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as err:
        status = f"HTTP {err.code}: {error_message(err)}"
        if err.code in (408, 429) or err.code >= 500:
            raise Transient(status, retry_after(err.headers.get("Retry-After"))) from None
        raise error(f"{what} refused the request: {status}") from None
    except (OSError, http.client.HTTPException) as err:  # timeouts, refused and dropped connections
        raise Transient(f"{type(err).__name__}: {err}") from None
    return payload


def get_ok(url: str, timeout: float = 2.0) -> bool:
    """True when a GET of `url` answers 200 (a server's /health)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (a number of seconds or an HTTP date); None without one."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_message(err: urllib.error.HTTPError) -> str:
    """The error message of an error reply: OpenAI's {"error": {"message": ...}}, or the body's text."""
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        return err.reason or ""
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else error or text
    except (ValueError, AttributeError):
        pass
    return one_line(str(text)) or str(err.reason)


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
