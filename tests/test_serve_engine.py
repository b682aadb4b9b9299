"""The serving engine alone: FIFO order, batching of compatible requests, cancelled requests dropped."""

import threading
import time

from januskit.serve.engine import Engine, QueueFull


class FakeJanus:
    def __init__(self):
        self.calls = []
        self.gate = threading.Event()

    def generate_images(self, prompts, n=1, on_step=None, **kw):
        self.gate.wait(5)
        self.calls.append(("images", list(prompts)))
        if on_step:
            on_step(1, 1)
        return type("R", (), {"images": [f"{p}#{i}" for p in prompts for i in range(n)]})()

    def chat_batch(self, convs, system_prompt=None, **kw):
        self.gate.wait(5)
        self.calls.append(("chat", len(convs)))
        return [f"answer {i}" for i in range(len(convs))]


def _img(engine, prompt, seed_key=()):
    return engine.submit("image", {"prompt": prompt, "options": {"n": 2, "cfg_weight": 5.0}}, ("same",) + seed_key)


def test_compatible_requests_share_one_call_and_cancelled_ones_are_dropped():
    fake = FakeJanus()
    engine = Engine(fake, max_queue=16)
    try:
        first = _img(engine, "a")  # occupies the worker until the gate opens
        time.sleep(0.2)
        b, c, d = _img(engine, "b"), _img(engine, "c"), _img(engine, "d", ("other",))
        c.cancel()  # the client went away before its turn
        fake.gate.set()
        assert first.future.result(5) == ["a#0", "a#1"]
        assert b.future.result(5) == ["b#0", "b#1"] and d.future.result(5) == ["d#0", "d#1"]
        assert c.future.cancelled()
        assert fake.calls == [("images", ["a"]), ("images", ["b"]), ("images", ["d"])]
        assert engine.stats["cancelled"] == 1 and b.progress == 1.0
    finally:
        engine.close()


def test_batches_merge_and_queue_limit():
    fake = FakeJanus()
    engine = Engine(fake, max_queue=3)
    try:
        jobs = [engine.submit("chat", {"messages": [], "options": {}}, ("p",)) for _ in range(3)]
        try:
            engine.submit("chat", {"messages": [], "options": {}}, ("p",))
            raise AssertionError("queue limit not enforced")
        except QueueFull:
            pass
        fake.gate.set()
        assert [j.future.result(5) for j in jobs]
        assert sum(n for kind, n in fake.calls if kind == "chat") == 3 and len(fake.calls) <= 2
    finally:
        engine.close()
