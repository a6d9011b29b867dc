"""task=serve against the official openai client and raw HTTP: a real server on 127.0.0.1."""
from __future__ import annotations

import http.client
import json
import signal
import time

import pytest
from openai import OpenAI

from tests.reference import flashmoe_greedy
from tests.serve_util import KEY, start_server


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = start_server(tiny("qwen3_5_moe"), tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0
    (summary,) = srv.events("run_summary")
    assert summary["status"] == "ok" and summary["requests"] > 0


@pytest.fixture(scope="module")
def tight(tiny, tmp_path_factory):
    """A server with small limits: batch 1, no queue, tiny caps."""
    srv = start_server(tiny("qwen3_5_moe"), tmp_path_factory.mktemp("tight"),
                       "task.max_batch=1", "task.max_queue=0", "task.max_prompt_tokens=32",
                       "task.max_tokens_cap=16", "task.max_body_kb=1", key=None)
    yield srv
    assert srv.stop() == 0


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_openai_client_chat_and_completions(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [server.model]
    msgs = [{"role": "user", "content": "Hello there"}]
    full = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=10)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens <= 10 and full.usage.prompt_tokens > 0
    assert full.choices[0].finish_reason in ("stop", "length")
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=10, stream=True) if ch.choices]
    assert "".join(parts) == text  # greedy: streaming and not give the same text
    comp = c.completions.create(model=server.model, prompt="Once upon", max_tokens=6)
    streamed = c.completions.create(model=server.model, prompt="Once upon", max_tokens=6,
                                    stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert chunks[-1].usage.completion_tokens == comp.usage.completion_tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == comp.choices[0].text


async def test_tokens_equal_solo_run(server, tiny):
    """Greedy over HTTP (token-id prompt) == the engine alone on the same checkpoint."""
    prompt = [5, 99, 310, 42, 7, 256, 11]
    solo, _, _ = await flashmoe_greedy(tiny("qwen3_5_moe"), prompt, 12)
    res = client(server).completions.create(model=server.model, prompt=prompt, max_tokens=12)
    n = res.usage.completion_tokens
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny("qwen3_5_moe"))
    eos = set(tok.eos_token_ids)
    want = solo[:n] if res.choices[0].finish_reason == "length" else solo[:n - 1]
    assert n == 12 or solo[n - 1] in eos
    assert res.choices[0].text == tok.decode(want)


def test_stop_string_cuts_the_text(server):
    c = client(server)
    base = c.completions.create(model=server.model, prompt="Stop here", max_tokens=12)
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if len(text) < 4 or not stop.strip():
        pytest.skip("the tiny model's greedy text is too short to cut")
    cut = c.completions.create(model=server.model, prompt="Stop here", max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.find(stop)]


@pytest.mark.parametrize("body,key,status", [
    ({"model": "M", "prompt": "hi"}, None, 401),
    ({"model": "M", "prompt": "hi"}, "wrong", 401),
    ("{not json", KEY, 400),
    ({"model": "nope", "prompt": "hi"}, KEY, 404),
    ({"model": "M", "prompt": "hi", "max_tokens": 10**6}, KEY, 400),
    ({"model": "M", "prompt": "hi", "temperature": -1}, KEY, 400),
    ({"model": "M", "prompt": ""}, KEY, 400),
    ({"model": "M", "prompt": "hi", "n": 2}, KEY, 400),
    ({"model": "M", "prompt": [1, 2, 10**7]}, KEY, 400),
    ({"model": "M", "prompt": "hi", "stop": 5}, KEY, 400),
    ([1, 2], KEY, 400),
])
def test_bad_requests(server, body, key, status):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model}
    got, _, data = server.request("POST", "/v1/completions", body, key=key)
    assert got == status, data
    err = json.loads(data)["error"]
    assert err["message"] and err["type"] and "Traceback" not in err["message"]


def test_limits(tight):
    big = {"model": tight.model, "prompt": "word " * 200}
    got, _, data = tight.request("POST", "/v1/completions", big)
    assert got == 413, data  # over task.max_body_kb=1
    long = {"model": tight.model, "prompt": list(range(3, 40))}
    got, _, data = tight.request("POST", "/v1/completions", long)
    assert got == 400 and json.loads(data)["error"]["code"] == "context_length_exceeded"
    got, _, _ = tight.request("POST", "/v1/completions", {"model": tight.model, "prompt": "a",
                                                          "max_tokens": 17})
    assert got == 400
    got, _, data = tight.request("GET", "/nowhere")
    assert got == 404 and json.loads(data)["error"]
    assert tight.request("GET", "/health")[0] == 200


def test_full_queue_gets_429_with_retry_after(tight):
    """Batch 1, queue 0: while one stream runs, a second request is turned away."""
    conn = http.client.HTTPConnection(tight.host, tight.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": tight.model, "prompt": "a b c", "max_tokens": 16, "stream": True,
         "temperature": 1.0, "seed": 3}), {"Content-Type": "application/json"})
    res = conn.getresponse()
    res.readline()  # the first chunk: the sequence is running
    got, headers, data = tight.request("POST", "/v1/completions",
                                       {"model": tight.model, "prompt": "x", "max_tokens": 2})
    conn.close()
    assert got == 429, data
    assert int(headers["retry-after"]) >= 1
    assert json.loads(data)["error"]["code"] == "queue_full"


def test_disconnect_cancels_the_sequence(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": server.model, "prompt": "tell me a long story", "max_tokens": 1000,
         "stream": True, "temperature": 1.0, "seed": 7}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    res = conn.getresponse()
    for _ in range(6):  # three chunks (data line + blank line each)
        res.readline()
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.time() + 20
    while time.time() < deadline and server.metrics()["flashmoe_active_sequences"]:
        time.sleep(0.1)
    m = server.metrics()
    assert m["flashmoe_active_sequences"] == 0 and m["flashmoe_slots_pinned"] == 0
    time.sleep(0.5)
    assert server.metrics()["flashmoe_decode_steps_total"] == m["flashmoe_decode_steps_total"]
    done = [e for e in server.events("request_done") if e["status"] == 499]
    assert done and done[-1]["tokens"] < 1000 and done[-1]["finish_reason"] == "cancelled"


def test_page_and_metrics(server):
    got, headers, page = server.request("GET", "/", key=None)
    assert got == 200 and b"/v1/chat/completions" in page and server.model.encode() in page
    m = server.metrics()
    for name in ("flashmoe_decode_tokens_per_second", "flashmoe_batch_size",
                 "flashmoe_expert_read_bytes_total", "flashmoe_cache_hit_rate",
                 "flashmoe_queued_sequences", "flashmoe_active_sequences"):
        assert name in m


def test_sigterm_drains_in_flight_stream(tiny, tmp_path):
    """SIGTERM mid-stream: the stream still runs to its end, then the server exits 0."""
    srv = start_server(tiny("qwen3_5_moe"), tmp_path / "drain", key=None)
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": srv.model, "prompt": "a b", "max_tokens": 24, "stream": True,
         "temperature": 1.0, "seed": 7}), {"Content-Type": "application/json"})
    res = conn.getresponse()
    res.readline()
    srv.proc.send_signal(signal.SIGTERM)
    rest = res.read().decode()
    conn.close()
    assert rest.rstrip().endswith("data: [DONE]")
    assert srv.stop() == 0
    (summary,) = srv.events("run_summary")
    assert summary["status"] == "ok" and summary["requests_ok"] == 1


async def test_concurrent_greedy_requests_equal_solo(server, tiny):
    """Eight requests of different lengths at once (they join the batch at different steps):
    each text equals its prompt run alone through the engine."""
    import asyncio

    from mlx_lm.utils import load_tokenizer
    from openai import AsyncOpenAI

    path = tiny("qwen3_5_moe")
    tok = load_tokenizer(path)
    eos = set(tok.eos_token_ids)
    prompts = [[5 + i, 99, 310, 42, 7, 256, 11][: 1 + i % 7] + [17] * i for i in range(8)]
    c = AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    async with c:
        got = await asyncio.gather(*(c.completions.create(
            model=server.model, prompt=p, max_tokens=10) for p in prompts))
    for p, res in zip(prompts, got):
        solo = (await flashmoe_greedy(path, p, 10))[0]
        cut = next((i for i, t in enumerate(solo) if t in eos), len(solo))
        assert res.choices[0].text == tok.decode(solo[:cut])
