"""HTTP layer: OpenAI-compatible chat and image endpoints, a web page, limits, auth. Validation happens here;
the model work happens in `Engine`.

    POST /v1/chat/completions   text + image_url (data URL) parts, stream (SSE), usage
    POST /v1/images/generations prompt, n, size (native only), response_format b64_json; seed, cfg_weight, cfg_cutoff, temperature
    GET  /v1/models, GET /health, GET / (the page), POST /ui/images + GET /ui/images/{id} (progress for the page)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError

from .engine import Engine, QueueFull

STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class Settings:
    model_name: str = "januskit"
    api_key: str | None = None
    allow_remote_urls: bool = False
    max_body_bytes: int = 16 * 2**20
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_n: int = 4
    max_tokens: int = 1024
    max_prompt_chars: int = 8000
    max_queue: int = 64
    request_timeout_s: float = 600.0


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _error(status, message, param=None, code=None, type_="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------------------------------------- parsing
def _decode_image(url: str, settings: Settings, where: str) -> Image.Image:
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_urls:
            raise APIError(400, f"{where}: remote image URLs are disabled on this server; send a data URL "
                                "(data:image/png;base64,...)", param=where, code="remote_url_disabled")
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                data = r.read(settings.max_image_bytes + 1)
        except Exception as e:
            raise APIError(400, f"{where}: could not fetch the image ({e})", param=where) from None
    elif url.startswith("data:"):
        header, _, b64 = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: only base64 data URLs are supported", param=where)
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the data URL", param=where, code="invalid_base64") from None
    else:
        raise APIError(400, f"{where}: image_url must be a data URL", param=where)
    if len(data) > settings.max_image_bytes:
        raise APIError(413, f"{where}: image is larger than {settings.max_image_bytes} bytes", param=where,
                       code="image_too_large")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > settings.max_image_pixels:
            raise APIError(413, f"{where}: image has {img.width}x{img.height} pixels, more than the limit of "
                                f"{settings.max_image_pixels}", param=where, code="image_too_large")
        return img.convert("RGB")
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise APIError(400, f"{where}: the data is not a decodable image", param=where, code="invalid_image") from None


def parse_messages(body: dict, settings: Settings) -> tuple[list[dict], str | None, int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out, system, n_images = [], None, 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported", param=f"messages[{i}].role")
        text, images = "", []
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype == "text":
                    text += str(part.get("text", ""))
                elif ptype == "image_url":
                    if role != "user":
                        raise APIError(400, f"{where}: images are only accepted in user messages", param=where)
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise APIError(400, f"{where}: image_url.url must be a string", param=where)
                    images.append(_decode_image(url, settings, where))
                    text += "<image_placeholder>"
                else:
                    raise APIError(400, f"{where}: unsupported content part type {ptype!r}", param=where)
        elif content is None and role == "assistant":
            text = ""
        else:
            raise APIError(400, f"messages[{i}].content must be a string or an array of parts",
                           param=f"messages[{i}].content")
        n_images += len(images)
        if role in ("system", "developer"):
            system = text
            continue
        out.append({"role": role, "content": text, "images": images})
    if n_images > settings.max_images:
        raise APIError(400, f"{n_images} images in the request; the limit is {settings.max_images}", param="messages")
    if sum(len(m["content"]) for m in out) > settings.max_prompt_chars:
        raise APIError(400, f"the conversation is longer than {settings.max_prompt_chars} characters", param="messages")
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    return out + [{"role": "assistant", "content": ""}], system, n_images


def _number(body, key, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise APIError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}", param=key)
    if not lo <= v <= hi:
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {v}", param=key)
    return kind(v)


# ---------------------------------------------------------------------------------------------- app
def create_app(janus, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = Engine(janus, max_queue=settings.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="januskit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.settings = engine, settings
    native = f"{janus.config.vq.image_size}x{janus.config.vq.image_size}"

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        if settings.api_key and path not in ("/health", "/") and not path.startswith("/static"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return _error(401, "missing or invalid API key (Authorization: Bearer ...)",
                              type_="authentication_error", code="invalid_api_key")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_body_bytes:
            return _error(413, f"request body larger than {settings.max_body_bytes} bytes", code="body_too_large")
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise APIError(413, f"request body larger than {settings.max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", code="invalid_json")
        return body

    async def wait(job, request: Request):
        """Await a job; cancel it if the client goes away or the timeout passes."""
        deadline = time.monotonic() + settings.request_timeout_s
        while not job.future.done():
            if await request.is_disconnected():
                job.cancel()
                raise APIError(499, "client disconnected", type_="cancelled")
            if time.monotonic() > deadline:
                job.cancel()
                raise APIError(504, "the request timed out in the server", type_="timeout")
            await asyncio.sleep(0.02)
        exc = job.future.exception() if not job.future.cancelled() else None
        if exc is not None:
            raise APIError(400, str(exc)) if isinstance(exc, ValueError) else exc
        return job.future.result()

    def submit(*args, **kw):
        try:
            return engine.submit(*args, **kw)
        except QueueFull as e:
            raise APIError(503, str(e), type_="server_busy", code="queue_full") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": engine.queue_depth(), **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "januskit"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return html.replace("{{MODEL}}", settings.model_name).replace("{{SIZE}}", native)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        messages, system, _ = parse_messages(body, settings)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        opts = {
            "max_new_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 256, 1, settings.max_tokens, int),
            "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", None, 0.0, 1.0),
            "seed": _number(body, "seed", None, -(2**63), 2**63 - 1, int),
        }
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported for chat completions", param="n")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        payload = {"messages": messages, "system": system, "options": opts}
        if not body.get("stream"):
            key = tuple(sorted(opts.items())) + ((uuid.uuid4().hex,) if opts["seed"] is not None else ())
            reply = await wait(submit("chat", payload, key), request)
            return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                                 "finish_reason": reply.finish_reason, "logprobs": None}],
                    "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.token_ids),
                              "total_tokens": reply.prompt_tokens + len(reply.token_ids)}}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job = submit("stream", payload, on_piece=lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p))

        def chunk(delta, finish=None, usage=None):
            d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                 "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            text = ""
            try:
                while True:
                    try:
                        piece = await asyncio.wait_for(pieces.get(), timeout=settings.request_timeout_s)
                    except asyncio.TimeoutError:
                        job.cancel()
                        return
                    if piece is None:
                        break
                    text += piece
                    yield chunk({"content": piece})
                try:
                    exc = job.future.exception(timeout=5)
                except Exception as e:  # cancelled or still running
                    exc = e
                if exc is not None:
                    yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
                    return
                n_out = len(janus.processor.encode(text, add_bos=False)) if text else 0
                finish = "length" if n_out >= opts["max_new_tokens"] else "stop"
                yield chunk({}, finish)
                if include_usage:
                    enc = janus.processor.encode_conversation(messages, system_prompt=system)
                    p = len(enc.input_ids)
                    yield chunk(None, usage={"prompt_tokens": p, "completion_tokens": n_out,
                                             "total_tokens": p + n_out})
                yield "data: [DONE]\n\n"
            finally:
                if not job.future.done():
                    job.cancel()  # the client went away: stop generating

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def image_request(body: dict) -> tuple[dict, tuple]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        if len(prompt) > settings.max_prompt_chars:
            raise APIError(400, f"'prompt' is longer than {settings.max_prompt_chars} characters", param="prompt")
        size = body.get("size") or native
        if size != native:
            raise APIError(400, f"size {size!r} is not supported: this model generates {native} images",
                           param="size", code="unsupported_size")
        fmt = body.get("response_format") or "b64_json"
        if fmt != "b64_json":
            raise APIError(400, "only response_format 'b64_json' is supported (this server stores no files)",
                           param="response_format")
        opts = {"n": _number(body, "n", 1, 1, settings.max_n, int),
                "cfg_weight": _number(body, "cfg_weight", None, 0.0, 20.0),  # None: the model's default
                "cfg_cutoff": _number(body, "cfg_cutoff", None, 0.0, 0.99),
                "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
                "seed": _number(body, "seed", None, -(2**63), 2**63 - 1, int)}
        key = tuple(sorted(opts.items())) + ((uuid.uuid4().hex,) if opts["seed"] is not None else ())
        return {"prompt": prompt, "options": opts}, key

    def b64png(img) -> str:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    @app.post("/v1/images/generations")
    async def images(request: Request):
        payload, key = image_request(await read_json(request))
        imgs = await wait(submit("image", payload, key), request)
        return {"created": int(time.time()), "data": [{"b64_json": b64png(im)} for im in imgs]}

    @app.post("/ui/images")
    async def ui_images(request: Request):
        payload, key = image_request(await read_json(request))
        return {"job": submit("image", payload, key).id}

    @app.get("/ui/images/{job_id}")
    async def ui_image_status(job_id: int):
        job = engine.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no such job {job_id}", code="not_found")
        if not job.future.done():
            return {"done": False, "progress": job.progress}
        exc = job.future.exception() if not job.future.cancelled() else None
        if exc is not None:
            return {"done": True, "error": str(exc)}
        return {"done": True, "progress": 1.0, "images": [b64png(im) for im in job.future.result()]}

    return app
