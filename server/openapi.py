"""The OpenAPI 3.1 document of the HTTP API (GET /openapi.json) and its docs page (GET /docs).

Request bodies come from the pydantic models the handlers validate with (JobRequest, JobInput,
JobPolicy, ServeTTSRequest); the few response shapes that have no model of their own are
described by the small models below. The realtime call endpoint takes SDP text, described as such.
"""
from __future__ import annotations

import html
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from server.schema import JobInput, JobPolicy, JobRequest, ServeTTSRequest

TITLE = "fishvoice"
JOB_STATES = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]


# --------------------------------------------------------------------------- response shapes
class JobError(BaseModel):
    """The job API's error body (RunPod's `safe_request` reads output.error)."""

    error: str
    output: dict[str, Any]
    request_id: str | None = Field(None, description="present on a 500: quote it when reporting the failure")


class FishError(BaseModel):
    """Upstream Fish Speech's error body on the /v1 routes."""

    statusCode: int
    error: str
    message: str


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    status: JOB_STATES
    delayTime: int | None = None
    executionTime: int | None = None
    output: Any = None
    error: str | None = None


class JobStream(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: JOB_STATES
    stream: list[dict[str, Any]]


class ReferenceResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    success: bool
    message: str
    reference_id: str | None = None
    reference_ids: list[str] | None = None


class ReferenceUpdate(BaseModel):
    old_reference_id: str
    new_reference_id: str


class ReferenceDelete(BaseModel):
    reference_id: str


class ReferenceUpload(BaseModel):
    id: str = Field(description="letters, digits, '-', '_' and spaces; at most 255 characters")
    audio: str = Field(description="the reference audio file, base64 (raw bytes in msgpack or multipart bodies)")
    text: str = Field(description="what the audio says")


class ReferenceForm(BaseModel):
    id: str
    audio: bytes = Field(json_schema_extra={"contentMediaType": "application/octet-stream"})
    text: str


class RealtimeForm(BaseModel):
    sdp: str = Field(description="the SDP offer")
    session: str | None = Field(None, description="a JSON session object (OpenAI Realtime shape)")


# --------------------------------------------------------------------------- the document
class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        name = model.__name__
        if name not in self.schemas:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for sub_name, sub in schema.pop("$defs", {}).items():
                self.schemas.setdefault(sub_name, sub)
            self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def json(self, model: type[BaseModel]) -> dict[str, Any]:
        return {"application/json": {"schema": self.ref(model)}}


def _op(summary: str, responses: dict[str, Any], *, body: dict[str, Any] | None = None, params: list | None = None,
        public: bool = False, tag: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if params:
        op["parameters"] = params
    if public:
        op["security"] = []
    return op


def _resp(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **({"content": content} if content else {})}


def build_document(server_url: str | None = None) -> dict[str, Any]:
    b = _Builder()
    request = b.ref(JobRequest)
    request_schema = b.schemas["JobRequest"]
    request_schema["properties"]["input"] = b.ref(JobInput)  # validated by the handler as JobInput
    request_schema["properties"]["policy"] = {"anyOf": [b.ref(JobPolicy), {"type": "null"}]}
    job_error = _resp("refused: the reason is in `error`", b.json(JobError))
    fish_error = _resp("refused: the reason is in `message`", b.json(FishError))
    status = _resp("the job's state (and output or error once it ended)", b.json(JobStatus))
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    fmt = [{"name": "format", "in": "query", "required": False,
            "schema": {"type": "string", "enum": ["json", "msgpack"]},
            "description": "json answers JSON; otherwise msgpack, as upstream"}]
    refs = _resp("the outcome", {"application/json": {"schema": b.ref(ReferenceResult)},
                                 "application/msgpack": {"schema": b.ref(ReferenceResult)}})
    ref_error = _resp("refused", {"application/json": {"schema": b.ref(ReferenceResult)}})
    jobs = "job API (RunPod)"
    paths: dict[str, Any] = {
        "/run": {"post": _op("Queue a job", {"200": status, "400": job_error, "404": job_error, "413": job_error,
                                             "503": job_error}, body={"application/json": {"schema": request}},
                             tag=jobs)},
        "/runsync": {"post": _op("Run a job and wait for it (then poll /status)",
                                 {"200": status, "400": job_error, "404": job_error, "413": job_error,
                                  "503": job_error},
                                 body={"application/json": {"schema": request}}, tag=jobs,
                                 params=[{"name": "wait", "in": "query", "required": False,
                                          "schema": {"type": "integer", "minimum": 1000, "maximum": 300000},
                                          "description": "milliseconds to wait before answering IN_PROGRESS"}])},
        "/status/{job_id}": {m: _op("A job's state and result", {"200": status, "404": job_error}, params=job_id,
                                    tag=jobs) for m in ("get", "post")},
        "/stream/{job_id}": {m: _op("Streamed items since the last poll",
                                    {"200": _resp("items", b.json(JobStream)), "404": job_error}, params=job_id,
                                    tag=jobs) for m in ("get", "post")},
        "/cancel/{job_id}": {"post": _op("Cancel a job (stops its generation)", {"200": status, "404": job_error},
                                         params=job_id, tag=jobs)},
        "/retry/{job_id}": {"post": _op("Run a FAILED or TIMED_OUT job again", {"200": status, "400": job_error,
                                                                                  "404": job_error, "503": job_error},
                                        params=job_id, tag=jobs)},
        "/purge-queue": {"post": _op("Cancel every queued job", {"200": _resp("how many were removed")}, tag=jobs)},
        "/health": {"get": _op("Job counts, workers and model state", {"200": _resp("health")}, public=True,
                               tag=jobs)},
        "/ping": {"get": _op("Readiness probe", {"200": _resp("ready"), "204": _resp("still loading"),
                                                 "503": job_error}, public=True, tag=jobs)},
        "/v1/tts": {"post": _op(
            "Speak text (upstream Fish Speech's ServeTTSRequest)",
            {"200": _resp("the audio (raw s16le PCM when streaming)",
                          {"audio/wav": {"schema": {"type": "string", "contentMediaType": "audio/wav"}}}),
             "400": fish_error, "404": fish_error, "413": fish_error, "415": fish_error, "503": fish_error},
            body=b.json(ServeTTSRequest), tag="Fish Speech")},
        "/v1/health": {"get": _op("Model state", {"200": _resp("health")}, public=True, tag="Fish Speech")},
        "/v1/references/add": {"post": _op(
            "Add a named reference voice", {"200": refs, "400": ref_error, "409": ref_error, "413": ref_error,
                                            "415": ref_error},
            body={"application/json": {"schema": b.ref(ReferenceUpload)},
                  "multipart/form-data": {"schema": b.ref(ReferenceForm)}}, params=fmt, tag="references")},
        "/v1/references/list": {"get": _op("Named reference voices", {"200": refs}, params=fmt, tag="references")},
        "/v1/references/delete": {"delete": _op(
            "Delete a reference voice", {"200": refs, "400": ref_error, "404": ref_error},
            params=fmt + [{"name": "reference_id", "in": "query", "required": True, "schema": {"type": "string"}}],
            tag="references")},
        "/v1/references/update": {"post": _op(
            "Rename a reference voice", {"200": refs, "400": ref_error, "404": ref_error, "409": ref_error},
            body=b.json(ReferenceUpdate), params=fmt, tag="references")},
        "/v1/realtime/calls": {"post": _op(
            "Start a WebRTC call: an SDP offer in, the answer out (OpenAI Realtime shape)",
            {"201": _resp("the SDP answer; Location names the call",
                          {"application/sdp": {"schema": {"type": "string"}}}),
             "400": _resp("refused"), "413": _resp("offer too large"), "415": _resp("not SDP"),
             "503": _resp("at the call limit, or the models are not loaded")},
            body={"application/sdp": {"schema": {"type": "string"}},
                  "multipart/form-data": {"schema": b.ref(RealtimeForm)}}, tag="realtime")},
        "/v1/realtime/config": {"get": _op("ICE servers and modes for browser clients", {"200": _resp("config")},
                                           tag="realtime")},
        "/v1/realtime/client_secrets": {"post": _op(
            "Mint an ephemeral ek_ client secret for a browser (OpenAI GA shape)",
            {"200": _resp("{value: ek_..., expires_at, session}"), "400": _resp("bad expires_after or session")},
            body={"application/json": {"schema": {"type": "object", "properties": {
                "expires_after": {"type": "object", "properties": {
                    "anchor": {"const": "created_at"}, "seconds": {"type": "integer", "minimum": 10,
                                                                   "maximum": 7200, "default": 600}}},
                "session": {"type": "object"}}}}}, tag="realtime")},
        "/metrics": {"get": _op("Prometheus metrics", {"200": _resp("text exposition format",
                                                                    {"text/plain": {"schema": {"type": "string"}}})},
                                tag="operations")},
        "/openapi.json": {"get": _op("This document", {"200": _resp("OpenAPI 3.1")}, public=True,
                                     tag="operations")},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": _version(),
                 "description": "Self-hosted voice agent and voice-cloning TTS on Fish Speech. The job API is also "
                                "served under /v2/{endpoint_id}/ for RunPod clients. Send `Authorization: Bearer "
                                "KEY` when the server has an API key."},
        "paths": paths,
        "components": {"schemas": b.schemas, "securitySchemes": SECURITY_SCHEMES},
        "security": [{"bearer": []}],
    }
    _declare_access(paths)
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "API_KEY (every scope) or a named key of the keys file; an operation's "
                              "security lists the scope it needs (realtime, tts, asr, jobs, references, admin)"},
    "clientSecret": {"type": "http", "scheme": "bearer", "bearerFormat": "ek_",
                     "description": "an ephemeral client secret from POST /v1/realtime/client_secrets: "
                                    "opens realtime sessions only"},
}


def _declare_access(paths: dict[str, Any]) -> None:
    """Each operation's scope, rate limit and refusals, from the one route table (server.scopes)."""
    from server import scopes
    from limits import parse

    from server.ratelimit import DEFAULT_LIMITS

    for path, item in paths.items():
        rule = scopes.rule_for(path)
        for op in item.values():
            if rule.scope is None:
                op["security"] = []
                continue
            needed = [] if rule.scope == scopes.ANY else [rule.scope]
            op["security"] = [{"bearer": needed}] + ([{"clientSecret": []}] if rule.ephemeral else [])
            op["responses"].setdefault("401", _resp("missing, unknown, forged or expired key"))
            op["responses"].setdefault("403", _resp("the key lacks the scope (or is a client secret)"))
            if rule.limit is not None:
                rate, concurrent = DEFAULT_LIMITS[rule.limit]
                item_ = parse(rate)
                op["x-rate-limit"] = {"group": rule.limit, "requests": item_.amount,
                                      "per_seconds": item_.get_expiry(), "concurrent": concurrent}
                op["responses"].setdefault("429", _resp("over the rate limit or concurrency cap; see Retry-After"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fishvoice")
    except PackageNotFoundError:
        return "0"


# --------------------------------------------------------------------------- routes
DOCUMENT = web.AppKey("openapi_document", dict)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[DOCUMENT])


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=render_docs(request.app[DOCUMENT]), content_type="text/html")


def render_docs(doc: dict[str, Any]) -> str:
    """A self-contained page (no scripts, nothing fetched) listing every operation and its schema."""
    import json

    rows = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            public = " (no key)" if op.get("security") == [] else ""
            codes = ", ".join(op["responses"])
            body = op.get("requestBody", {}).get("content", {})
            types = ", ".join(body)
            rows.append(f"<h3><code>{method.upper()} {html.escape(path)}</code>{public}</h3>"
                        f"<p>{html.escape(op['summary'])}</p>"
                        + (f"<p>body: <code>{html.escape(types)}</code></p>" if types else "")
                        + f"<p>responses: {html.escape(codes)}</p>")
    schemas = "".join(f"<details><summary><code>{html.escape(name)}</code></summary><pre>"
                      f"{html.escape(json.dumps(schema, indent=2))}</pre></details>"
                      for name, schema in doc["components"]["schemas"].items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fishvoice API</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
            "h3{margin-bottom:.2rem}pre{background:#f4f4f4;padding:.5rem;overflow:auto}</style></head><body>"
            f"<h1>fishvoice API</h1><p>{html.escape(doc['info']['description'])}</p>"
            "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>"
            + "".join(rows) + "<h2>Schemas</h2>" + schemas + "</body></html>")


def install(app: web.Application) -> None:
    app[DOCUMENT] = build_document()
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
