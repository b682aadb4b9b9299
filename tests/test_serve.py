"""The HTTP server, driven by the official openai client, raw HTTP and a bounded load test (loopback only)."""

import base64
import io
import json
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from januskit import Janus  # noqa: E402
from januskit.config import preset  # noqa: E402
from januskit.processor import JanusProcessor  # noqa: E402
from januskit.serve.app import Settings, create_app  # noqa: E402
from januskit.weights import build_on_meta, init_weights  # noqa: E402

from conftest import OFFICIAL_TINY  # noqa: E402

KEY = "test-key"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, janus, settings):
        self.port = _free_port()
        self.app = create_app(janus, settings)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def janus():
    torch.manual_seed(0)
    model = init_weights(build_on_meta(preset("tiny")), seed=0)
    return Janus(model, JanusProcessor.from_pretrained(OFFICIAL_TINY, num_image_tokens=16, image_size=64))


@pytest.fixture(scope="module")
def server(janus):
    s = Server(janus, Settings(model_name="tiny", api_key=KEY, max_n=4, max_tokens=64))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _data_url(path=OFFICIAL_TINY / "image_0.png", fmt="PNG"):
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _image_message(text="What is in the image?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url()}},
                                         {"type": "text", "text": text}]}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_with_image_matches_library(client, janus):
    r = client.chat.completions.create(model="tiny", messages=_image_message(), max_tokens=8, temperature=0)
    want = janus.chat(messages=[{"role": "user", "content": "<image_placeholder>What is in the image?",
                                 "images": [Image.open(OFFICIAL_TINY / "image_0.png")]}], max_new_tokens=8)
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == want.prompt_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_concatenates_to_plain_answer(client):
    plain = client.chat.completions.create(model="tiny", messages=_image_message(), max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=_image_message(), max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == plain.choices[0].message.content
    assert finish in ("stop", "length") and usage.prompt_tokens == plain.usage.prompt_tokens


def test_image_generation(client, janus):
    r = client.images.generate(model="tiny", prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                               extra_body={"seed": 3, "cfg_weight": 5.0})
    assert len(r.data) == 2
    imgs = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert all(im.size == (64, 64) for im in imgs)
    want = janus.generate_images("a red circle", n=2, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, want.images))


def test_api_key_required(server):
    no_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


def _post(server, path, body, raw=None):
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)


def test_malformed_inputs_are_4xx_and_server_survives(server):
    bad_png = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    big = Image.new("RGB", (5000, 5000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    huge = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    img = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": "hi"}]}]
    cases = [
        ("/v1/chat/completions", None, b"{not json"),
        ("/v1/chat/completions", [1, 2], None),
        ("/v1/chat/completions", {"messages": []}, None),
        ("/v1/chat/completions", {"messages": img("data:image/png;base64,@@@")}, None),
        ("/v1/chat/completions", {"messages": img(bad_png)}, None),
        ("/v1/chat/completions", {"messages": img(huge)}, None),
        ("/v1/chat/completions", {"messages": img("https://example.com/x.png")}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, None),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None),
        ("/v1/chat/completions", {"messages": img(_data_url()) * 5}, None),
        ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, None),
        ("/v1/images/generations", {"prompt": "x", "n": 99}, None),
        ("/v1/images/generations", {"prompt": ""}, None),
        ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, None),
        ("/v1/images/generations", {"prompt": "x" * 100000}, None),
    ]
    for path, body, raw in cases:
        r = _post(server, path, body, raw)
        assert 400 <= r.status_code < 500, (path, body if raw is None else raw, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["message"] and "type" in err and "param" in err and "code" in err
    r = _post(server, "/v1/images/generations", {"prompt": "x", "size": "1024x1024"})
    assert "64x64" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_concurrent_load_mixed_chat_and_generation(server, client):
    def chat(i):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hello {i}"}],
                                              max_tokens=6).choices[0].message.content is not None

    def gen(i):
        return len(client.images.generate(model="tiny", prompt=f"shape {i}", n=1, size="64x64").data) == 1

    jobs = [chat if i % 2 else gen for i in range(24)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batches0 = server.app.state.engine.stats["batches"]
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f_i: f_i[0](f_i[1]), [(f, i) for i, f in enumerate(jobs)]))
    dt = time.perf_counter() - t
    assert all(results)
    batches = server.app.state.engine.stats["batches"] - batches0
    print(f"\nload: {len(jobs)} requests in {dt:.2f}s = {len(jobs) / dt:.1f} req/s, {batches} model batches")
    assert batches < len(jobs)  # concurrent compatible requests shared model calls
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss1 - rss0 < 300 * 1024  # KiB: memory stays flat under load
    assert httpx.get(server.url + "/health").json()["failed"] == 0


def test_web_page_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "januskit" in r.text and "/v1/chat/completions" in r.text
