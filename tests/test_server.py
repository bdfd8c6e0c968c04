"""The OpenAI-compatible server, through a real uvicorn on 127.0.0.1: the official openai client, the malformed-input
matrix, API key, metrics, client disconnect, SLO refusal, SIGTERM drain."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import moelite
from moelite.serve.scheduler import SchedulerConfig
from moelite.serve.server import ServerSettings, _uvicorn_server, create_app, is_loopback

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: avoid OpenMP spin-waits on a shared machine
    path = tiny("qwen2_moe", tokenizer=True)
    eng = moelite.load(path, expert_budget="50%")
    settings = ServerSettings(port=_free_port(), api_key=KEY, model_name="tiny", max_body_bytes=1 << 20,
                              scheduler=SchedulerConfig(mode="slo", max_batch=8))
    app = create_app(eng, settings)
    with _running(app, settings):
        base = f"http://127.0.0.1:{settings.port}"
        yield {"base": base, "state": app.state.moelite, "engine": eng, "path": path}
    torch.set_num_threads(prev)


@contextlib.contextmanager
def _running(app, settings):
    """`app` served by a real uvicorn on a thread of this process, for the duration of the block."""
    srv = _uvicorn_server(app, settings, log_level="warning")
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started and time.time() - t0 < 60:
        time.sleep(0.02)
    assert srv.started
    try:
        yield srv
    finally:
        srv.should_exit = True
        th.join(20)


def _start_serve(server, *extra, stderr=subprocess.DEVNULL):
    """`moelite serve` on the tiny model in a child process, once its /health answers: (process, client)."""
    port = _free_port()
    env = dict(os.environ, MOELITE_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "moelite.cli", "serve", "--model", str(server["path"]), "--port",
                             str(port), "--no-profile", "--num-threads", "1", "--log-level", "warning",
                             "--expert-budget", "50%", *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)
    h = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    t0 = time.time()
    while time.time() - t0 < 90:
        try:
            if h.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    return proc, h


def _http(server, key=KEY):
    return httpx.Client(base_url=server["base"], headers={"Authorization": f"Bearer {key}"} if key else {},
                        timeout=60)


def test_openai_client_completions_chat_streaming_models_key(server):
    c = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in c.models.list()] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    eng = server["engine"]
    ref = eng.generate("Hello", max_tokens=6, temperature=0)
    assert r.choices[0].text == ref.text  # served through the batcher == the engine's own decode
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    # no chat template in this tokenizer: the documented plain template
    assert chat.usage.prompt_tokens == len(eng.tokenizer.encode("User: hi\nAssistant:"))
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="Hello", max_tokens=6,
                                                               temperature=0, stream=True) if ch.choices]
    assert "".join(pieces) == ref.text
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    r = c.completions.create(model="tiny", prompt="ab", max_tokens=3, n=3, temperature=0.8, seed=1,
                             extra_body={"task": "chat", "top_k": 20})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)


BIG = "x" * 300  # 300 byte-level tokens > the 256-token context


MATRIX = [  # (name, body bytes or dict, path, expected status, field named in the message)
    ("non-JSON", b"this is not json", "/v1/completions", 400, "body"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', "/v1/completions", 400, "body"),
    ("empty body", b"", "/v1/completions", 400, "body"),
    ("JSON array", b"[1, 2]", "/v1/completions", 400, "body"),
    ("deeply nested", b"[" * 100000 + b"]" * 100000, "/v1/completions", 400, "body"),
    ("NaN", b'{"prompt": "hi", "temperature": NaN}', "/v1/completions", 400, "temperature"),
    ("Infinity", b'{"prompt": "hi", "top_p": Infinity}', "/v1/completions", 400, "top_p"),
    ("max_tokens string", {"prompt": "hi", "max_tokens": "5"}, "/v1/completions", 400, "max_tokens"),
    ("max_tokens float", {"prompt": "hi", "max_tokens": 5.5}, "/v1/completions", 400, "max_tokens"),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, "/v1/completions", 400, "max_tokens"),
    ("max_tokens beyond context", {"prompt": "hi", "max_tokens": 10000}, "/v1/completions", 400, "max_tokens"),
    ("chat max_tokens beyond context", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300},
     "/v1/chat/completions", 400, "max_tokens"),
    ("temperature wrong type", {"prompt": "hi", "temperature": "hot"}, "/v1/completions", 400, "temperature"),
    ("temperature range", {"prompt": "hi", "temperature": 3}, "/v1/completions", 400, "temperature"),
    ("stream wrong type", {"prompt": "hi", "stream": "yes"}, "/v1/completions", 400, "stream"),
    ("top_p 0", {"prompt": "hi", "top_p": 0}, "/v1/completions", 400, "top_p"),
    ("top_p > 1", {"prompt": "hi", "top_p": 1.5}, "/v1/completions", 400, "top_p"),
    ("n huge", {"prompt": "hi", "n": 100000}, "/v1/completions", 400, "n"),
    ("n 0", {"prompt": "hi", "n": 0}, "/v1/completions", 400, "n"),
    ("stop list huge", {"prompt": "hi", "stop": ["a"] * 10000}, "/v1/completions", 400, "stop"),
    ("stop string huge", {"prompt": "hi", "stop": "s" * 5000}, "/v1/completions", 400, "stop"),
    ("stop empty", {"prompt": "hi", "stop": [""]}, "/v1/completions", 400, "stop"),
    ("empty prompt", {"prompt": ""}, "/v1/completions", 400, "prompt"),
    ("empty prompt list", {"prompt": []}, "/v1/completions", 400, "prompt"),
    ("prompt wrong type", {"prompt": 5}, "/v1/completions", 400, "prompt"),
    ("prompt missing", {"max_tokens": 3}, "/v1/completions", 400, "prompt"),
    ("prompt longer than context", {"prompt": BIG}, "/v1/completions", 400, "prompt"),
    ("token ids out of range", {"prompt": [1, 2, 999999]}, "/v1/completions", 400, "prompt"),
    ("many token ids", {"prompt": list(range(3, 100)) * 1000}, "/v1/completions", 400, "prompt"),
    ("too many prompts", {"prompt": ["a"] * 20}, "/v1/completions", 400, "prompt"),
    ("unknown field", {"prompt": "hi", "frobnicate": 1}, "/v1/completions", 400, "frobnicate"),
    ("unknown model", {"prompt": "hi", "model": "gpt-9"}, "/v1/completions", 404, "model"),
    ("seed negative", {"prompt": "hi", "seed": -1}, "/v1/completions", 400, "seed"),
    ("echo", {"prompt": "hi", "echo": True}, "/v1/completions", 400, "echo"),
    ("logprobs", {"prompt": "hi", "logprobs": 5}, "/v1/completions", 400, "logprobs"),
    ("penalty", {"prompt": "hi", "presence_penalty": 1.0}, "/v1/completions", 400, "presence_penalty"),
    ("ttft_ms negative", {"prompt": "hi", "ttft_ms": -5}, "/v1/completions", 400, "ttft_ms"),
    ("alpha range", {"prompt": "hi", "substitution_alpha": 1.0}, "/v1/completions", 400, "substitution_alpha"),
    ("unknown task", {"prompt": "hi", "task": "astrology"}, "/v1/completions", 400, "task"),
    ("messages empty", {"messages": []}, "/v1/chat/completions", 400, "messages"),
    ("messages wrong type", {"messages": "hi"}, "/v1/chat/completions", 400, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "/v1/chat/completions", 400, "messages.0.role"),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}, "/v1/chat/completions", 400, "messages"),
    ("bad content part", {"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]},
     "/v1/chat/completions", 400, "messages.0.content"),
    ("chat prompt longer than context", {"messages": [{"role": "user", "content": BIG}]},
     "/v1/chat/completions", 400, "prompt"),
    ("oversized body", {"prompt": "x" * (2 << 20)}, "/v1/completions", 413, "body"),
    ("no such route", {"prompt": "hi"}, "/v1/engines", 404, ""),
]


def test_malformed_input_matrix_is_4xx_then_valid_request_succeeds(server):
    with _http(server) as h:
        for name, body, path, status, param in MATRIX:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post(path, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert param in err["message"], (name, err)
            assert "Traceback" not in r.text and "/work" not in r.text and "/tmp" not in r.text, name
        r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    b, t0 = server["state"].batcher, time.time()
    while not b.idle() and time.time() - t0 < 10:  # the response may leave before the batcher's bookkeeping ends
        time.sleep(0.005)
    assert b.idle()


def test_key_on_every_route_but_health_and_no_cors_by_default(server):
    with _http(server, key=None) as h:
        assert h.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions")):
            r = h.request(method, path, json={"prompt": "hi"})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    with _http(server) as h:
        r = h.get("/v1/models", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_metrics_and_slo_refusal(server):
    with _http(server) as h:
        r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ttft_ms": 0.001})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "time-to-first-token target" in r.json()["error"]["message"]
        text = h.get("/metrics").text
    for name in ("moelite_queue_depth", "moelite_running_requests", "moelite_tokens_per_second",
                 "moelite_ttft_seconds_bucket", "moelite_tpot_seconds_bucket", "moelite_expert_exact_hit_rate",
                 "moelite_expert_substituted_rate", "moelite_expert_bytes_read_total", "moelite_resident_expert_bytes",
                 "moelite_process_rss_bytes", "moelite_slo_refused_total", "moelite_requests_total",
                 "moelite_expert_read_errors_total", "moelite_expert_integrity_errors_total"):
        assert name in text, name
    assert 'moelite_requests_total{endpoint="completions",outcome="429"}' in text


def test_client_disconnect_cancels_the_request(server):
    st = server["state"]
    b = st.batcher
    before = b.tokens_generated
    with _http(server) as h:
        with h.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 250, "n": 4, "stream": True,
                                                       "temperature": 0.8}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the connection is closed here, mid-stream
    t0 = time.time()
    while (b.running or not b.idle()) and time.time() - t0 < 10:
        time.sleep(0.005)
    assert b.running == [] and b.idle()
    assert b.tokens_generated - before < 4 * 250  # stopped early, not decoded to the end
    assert st.outcomes[("completions", "cancelled")] >= 1


def test_sigterm_drains_in_flight_and_refuses_new_work(server, tmp_path):
    proc, h = _start_serve(server, stderr=subprocess.PIPE)
    try:
        got: dict = {"chunks": 0, "done": False, "finish": []}

        def stream():
            # greedy on this checkpoint never samples EOS: 8 x 240 tokens keep the request in flight
            with h.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 240, "n": 8,
                                                           "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        got["done"] = True
                    elif line.startswith("data: "):
                        got["chunks"] += 1
                        ch = json.loads(line[6:])["choices"][0]
                        if ch["finish_reason"]:
                            got["finish"].append(ch["finish_reason"])
                        time.sleep(0.002)  # a slow reader keeps the request in flight
        th = threading.Thread(target=stream)
        th.start()
        while got["chunks"] < 3 and th.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert h.get("/health").status_code == 503
        th.join(120)
        assert got["done"] and got["finish"] == ["length"] * 8  # the in-flight request finished in full
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _closed_within(sock, seconds: float) -> bool:
    """True when the server closes `sock` (recv returns b'') within `seconds`."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except socket.timeout:
        return False
    except OSError:  # reset by the server: closed too
        return True


def _read_response(sock) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(v) for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
                  if k.strip().lower() == b"content-length")
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def test_idle_and_slow_header_connections_are_closed_after_the_header_timeout(tiny):
    path = tiny("qwen2_moe", tokenizer=True)
    eng = moelite.load(path, expert_budget="50%")
    settings = ServerSettings(port=_free_port(), model_name="tiny", header_timeout_s=1.0, keep_alive_s=1.0,
                              max_connections=64, profile=False)
    with _running(create_app(eng, settings), settings):
        idle = socket.create_connection(("127.0.0.1", settings.port))  # connects, sends nothing
        slow = socket.create_connection(("127.0.0.1", settings.port))  # trickles a header that never ends
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(3):
            time.sleep(0.3)
            slow.sendall(b"X-Slow: 1\r\n")
        assert _closed_within(idle, 3.0) and _closed_within(slow, 3.0)
        # a connection that sends its request in time is served, and may send another after its response
        with socket.create_connection(("127.0.0.1", settings.port)) as ok:
            ok.settimeout(10)
            for _ in range(2):
                ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert _read_response(ok).startswith(b"HTTP/1.1 200")
                time.sleep(0.3)
            assert _closed_within(ok, 4.0)  # then idle: closed too


def test_prompts_are_tokenized_off_the_event_loop(server, monkeypatch):
    import asyncio

    tok = server["engine"].tokenizer
    seen = []
    real = tok.encode

    def encode(*a, **kw):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:  # no running loop: a worker thread
            seen.append("worker")
        return real(*a, **kw)

    monkeypatch.setattr(tok, "encode", encode)
    with _http(server) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello " * 50, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert seen and set(seen) == {"worker"}


def test_accept_error_storm_is_logged_once_per_interval():
    import logging

    from moelite.serve.server import OncePerInterval

    f = OncePerInterval(interval=60.0)
    rec = lambda msg: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)  # noqa: E731
    passed = [f.filter(rec("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed[0] and not any(passed[1:]) and f.suppressed == 999
    assert f.filter(rec("Task exception was never retrieved"))  # other messages are untouched
    f.last -= 61  # the next interval: one line, with the count of what was held back
    r = rec("socket.accept() out of system resource")
    assert f.filter(r) and "999 more like it" in r.getMessage()


def _long_stream(h, got):
    try:
        with h.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 240, "n": 8,
                                                       "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got["chunks"] += 1
                    if '"error"' in line:
                        got["error"] = json.loads(line[6:])["error"]
                time.sleep(0.002)  # a slow reader: the request outlives the drain timeout
    except httpx.TransportError as exc:
        got["transport_error"] = repr(exc)


def _streaming_then_sigterm(server, drain_timeout: str):
    """A live server with a long streamed request in flight, sent one SIGTERM: (process, stream result, thread)."""
    proc, h = _start_serve(server, "--drain-timeout", drain_timeout)
    got: dict = {"chunks": 0}
    th = threading.Thread(target=_long_stream, args=(h, got))
    th.start()
    while got["chunks"] < 3 and th.is_alive():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    return proc, got, th


def test_sigterm_drain_timeout_cuts_streams_with_an_error_event(server):
    # 0.05 s: far less than the rest of the request's generation takes (8 x 240 tokens of the tiny model, about
    # 0.25 s after the first chunks on a fast engine; 2 s, and under load even 0.2 s, let all of it finish)
    proc, got, th = _streaming_then_sigterm(server, "0.05")
    t0 = time.time()  # the signal was just sent
    try:
        assert proc.wait(timeout=30) == 0
        took = time.time() - t0
        th.join(10)
        assert got.get("error", {}).get("code") == 503 or "server stopped" in got.get("error", {}).get("message", "")
        assert took < 0.05 + 6  # the drain timeout plus the cut streams' close
    finally:
        proc.kill()


def test_second_sigterm_exits_at_once_without_abort(server):
    proc, got, th = _streaming_then_sigterm(server, "60")
    try:
        time.sleep(0.3)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143  # not -6 (SIGABRT)
        assert time.time() - t0 < 5
        th.join(10)
    finally:
        proc.kill()


def test_health_is_degraded_while_expert_reads_fail(server):
    reader = server["engine"].reader
    with _http(server, key=None) as c:
        assert c.get("/health").json()["status"] == "ok"
        reader.failing[(1, 3)] = "expert 3 of layer 1: reading ... from 'model.safetensors' at offset 42 failed twice"
        try:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "degraded"
            assert "model.safetensors" in r.json()["reason"]
        finally:
            reader.failing.clear()
        assert c.get("/health").status_code == 200


def test_nonfinite_logits_end_the_request_with_an_error_and_the_next_works(server):
    eng = server["engine"]
    nan_from = {"call": 0, "n": 0}  # lm_head calls from this one on give NaN logits (0: none)

    def hook(module, args, out):
        nan_from["n"] += 1
        if nan_from["call"] and nan_from["n"] >= nan_from["call"]:
            return torch.full_like(out, float("nan"))
    handle = eng.model.lm_head.register_forward_hook(hook)
    body = {"prompt": "Hello", "max_tokens": 12, "temperature": 0}
    try:
        with _http(server) as h:
            nan_from.update(call=1, n=0)  # from the prefill: the error is the response's status and body
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 500
            msg = r.json()["error"]["message"]
            assert "non-finite logits (NaN or inf) at the prompt's prefill" in msg and "moelite verify" in msg
            assert "/tmp" not in r.text and "Traceback" not in r.text
            nan_from.update(call=4, n=0)  # mid-stream (decode step 3): text, then an error event, not "stop"
            with h.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                assert r.status_code == 200
                events = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            err = events[-1]["error"]
            assert err["code"] == 500 and "non-finite logits (NaN or inf) at decode step 3" in err["message"]
            assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"])
            nan_from.update(call=0)
            r = h.post("/v1/completions", json=body)  # the engine goes on
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == eng.generate("Hello", max_tokens=12,
                                                                                          temperature=0).text
    finally:
        handle.remove()


def test_integrity_error_is_named_in_the_error_body_and_health_degrades(server):
    eng = server["engine"]
    saved = eng.reader.checksums
    eng.reader.checksums = {k: v ^ 1 for k, v in saved.items()}  # every expert read now fails its checksum
    body = {"prompt": list(range(3, 60)), "max_tokens": 2, "temperature": 0}  # routes to more experts than fit
    try:
        with _http(server) as h:
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 500
            msg = r.json()["error"]["message"]
            assert re.search(r"expert \d+ of layer \d+: its bytes \(.*'model.safetensors' at offset \d+\) do not "
                             r"match the checksum recorded .*moelite verify", msg), msg
            assert "/tmp" not in r.text and str(server["path"]) not in r.text and "Traceback" not in r.text
            health = h.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "degraded"
    finally:
        eng.reader.checksums = saved
        eng.reader.failing.clear()
    with _http(server) as h:
        assert h.post("/v1/completions", json=body).status_code == 200
        assert h.get("/health").status_code == 200


def test_serve_says_what_the_budget_resolved_to(server):
    """`moelite serve` prints the budget note (what 'auto' resolved to) before serving, as generate does."""
    proc, h = _start_serve(server, "--expert-budget", "auto", stderr=subprocess.PIPE)
    try:
        assert h.get("/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        h.close()
    assert "expert_budget 'auto' = " in err and proc.returncode == 0
