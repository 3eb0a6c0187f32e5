"""A small OpenAI-API client on the standard library (http.client): the server's model list, and streamed
completions whose server-sent events are parsed as they arrive, each token's arrival stamped on the client's clock.

Prompts go as token ids and come back as token ids (vLLM's `return_token_ids`), so no tokenizer is needed on either
side and the generated tokens can be compared with the offline engine's.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tieremu.errors import ConfigError, TieremuError


class ServerError(TieremuError):
    """The server could not be reached, or answered something other than the OpenAI API."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    base: str  # path prefix before /v1 ("" for a server at the root)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base}"

    def connect(self, timeout_s: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout_s)


def endpoint(url: str) -> Endpoint:
    """Parse --server URL (http://host:port, optionally with a path before /v1); ConfigError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--server {url!r}: not an http(s) URL with a host; give e.g. http://127.0.0.1:8000 "
                          "(the address of a vLLM OpenAI server)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"--server {url!r}: the port is not a number from 0 to 65535") from None
    if parts.query or parts.fragment:
        raise ConfigError(f"--server {url!r}: give the server's address only (no ?query or #fragment)")
    base = parts.path.rstrip("/")
    base = base.removesuffix("/v1")
    return Endpoint(parts.scheme, parts.hostname, port, base)


@dataclass(frozen=True)
class ServedModel:
    name: str  # what requests name as "model"
    root: str  # the directory (or hub name) the server loaded
    max_model_len: int | None


def models(ep: Endpoint, timeout_s: float = 10.0) -> list[ServedModel]:
    """GET /v1/models; ServerError naming the URL when it cannot be reached or is not an OpenAI server."""
    data = get_json(ep, "/v1/models", timeout_s)
    listed = data.get("data") if isinstance(data, dict) else None
    if not isinstance(listed, list) or not listed:
        raise ServerError(f"{ep.url}/v1/models lists no model: is this a vLLM OpenAI server?")
    out = []
    for m in listed:
        if not isinstance(m, dict) or "id" not in m:
            raise ServerError(f"{ep.url}/v1/models: an entry without an id: {m!r}")
        length = m.get("max_model_len")
        out.append(ServedModel(str(m["id"]), str(m.get("root") or m["id"]),
                               int(length) if isinstance(length, int) else None))
    return out


def get_json(ep: Endpoint, path: str, timeout_s: float) -> object:
    conn = ep.connect(timeout_s)
    try:
        conn.request("GET", ep.base + path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(f"{ep.url}: cannot reach the server ({_why(exc)}); is a vLLM OpenAI server running "
                          "there?") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise ServerError(f"{ep.url}{path}: HTTP {resp.status} {resp.reason}: {body[:300].decode(errors='replace')}")
    try:
        return json.loads(body)
    except ValueError:
        raise ServerError(f"{ep.url}{path}: the answer is not JSON: {body[:300].decode(errors='replace')}") from None


@dataclass
class Streamed:
    """One streamed completion, stamped on time.monotonic()."""

    sent_s: float
    first_token_s: float = float("nan")
    last_token_s: float = float("nan")
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0  # events that carried tokens (a server may send several tokens in one)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # from usage.prompt_tokens_details (vLLM: --enable-prompt-tokens-details)
    finish_reason: str | None = None


def stream_completion(ep: Endpoint, model: str, prompt: list[int], max_tokens: int, timeout_s: float) -> Streamed:
    """POST /v1/completions with stream=true, greedy, exactly max_tokens tokens (ignore_eos), token ids back; each
    event parsed as it arrives. ServerError on a refused request, an error event or a stream cut short."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True, "stream": True, "return_token_ids": True,
                       "stream_options": {"include_usage": True}})
    out = Streamed(time.monotonic())
    conn = ep.connect(timeout_s)
    try:
        conn.request("POST", ep.base + "/v1/completions", body=body,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ServerError(f"{ep.url}/v1/completions: HTTP {resp.status} {resp.reason}: "
                              f"{resp.read()[:500].decode(errors='replace')}")
        done = False
        for data in events(resp):
            if data == "[DONE]":
                done = True
                break
            _take(out, json.loads(data), ep)
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(f"{ep.url}/v1/completions: the stream broke ({_why(exc)})") from None
    finally:
        conn.close()
    if not done:
        raise ServerError(f"{ep.url}/v1/completions: the stream ended without [DONE] after {len(out.token_ids)} "
                          "tokens (did the server stop?)")
    if len(out.token_ids) != max_tokens:
        raise ServerError(f"{ep.url}/v1/completions: {len(out.token_ids)} tokens came back, {max_tokens} were asked "
                          f"for (finish reason {out.finish_reason!r})")
    return out


def events(resp: http.client.HTTPResponse) -> Iterator[str]:
    """The data of each server-sent event, as the lines arrive (an event ends at a blank line; its data lines are
    joined with newlines; comments and other fields are skipped)."""
    data: list[str] = []
    while True:
        raw = resp.readline()
        if not raw:
            if data:
                yield "\n".join(data)
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))


def _take(out: Streamed, event: object, ep: Endpoint) -> None:
    now = time.monotonic()
    if not isinstance(event, dict):
        raise ServerError(f"{ep.url}/v1/completions: an event that is not a JSON object: {event!r}")
    if "error" in event:
        raise ServerError(f"{ep.url}/v1/completions: the server reported an error: {event['error']}")
    for choice in event.get("choices") or ():
        ids = choice.get("token_ids")
        if ids is None and choice.get("text"):
            raise ServerError(f"{ep.url}/v1/completions: text came back without token_ids; tieremu needs vLLM's "
                              "return_token_ids (vLLM 0.10.2 or later)")
        if ids:
            if not out.token_ids:
                out.first_token_s = now
            out.last_token_s = now
            out.token_ids.extend(int(t) for t in ids)
            out.chunks += 1
        if choice.get("finish_reason") is not None:
            out.finish_reason = str(choice["finish_reason"])
    usage = event.get("usage")
    if isinstance(usage, dict):
        out.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            out.cached_tokens = int(details["cached_tokens"])


def _why(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}"
    return f"{type(exc).__name__}: {exc}"
