"""The OpenAI Responses API (issue 12) through the official `openai` client: created streamed
and not, background responses picked up again with `retrieve(id, stream=True,
starting_after=N)` after a dropped connection — on the same instance, on another one sharing
Redis, and after `kill -9` of the owner (takeover) — cancel, delete, expiry, another key's
response refused; every event checked against the SDK's typed models (strict validation: a
field the SDK cannot parse fails the test). And a resumable chat-completions stream that
Chromium's `EventSource` reconnects to with `Last-Event-ID` through a proxy that keeps cutting
its connections: the text arrives once, complete."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import time

import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from conftest import expected_text, metric_value
from resumelib import CuttingProxy, Redis

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
OPENING = ["response.created", "response.in_progress", "response.output_item.added",
           "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()


def client(server, key: str = "key-1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{server.addr}/v1", api_key=key, max_retries=0,
                         timeout=30)


def raw_events(server, path: str, body: dict | None = None, key: str = "key-1",
               stop_after: int | None = None) -> list[dict]:
    """An SSE response's events as JSON, each validated strictly against the SDK's union of
    stream events; `stop_after`: drop the connection after that many."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    conn.request("POST" if body is not None else "GET", path,
                 json.dumps(body) if body is not None else None, headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("content-type") == "text/event-stream"
    events, kind = [], None
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            v = json.loads(line[6:])
            assert v["type"] == kind, (kind, v)
            STREAM_EVENT.validate_python(v, strict=False)
            events.append(v)
            if stop_after is not None and len(events) >= stop_after:
                conn.sock.close()
                break
    conn.close()
    return events


def check_shapes(events: list[dict], first: int = 0, terminal: str = "response.completed") -> str:
    """Sequence numbers contiguous from `first`, OpenAI's order; returns the deltas' text."""
    seqs = [e["sequence_number"] for e in events]
    assert seqs == list(range(first, first + len(events))), seqs
    types = [e["type"] for e in events]
    opening = [t for t in OPENING if OPENING.index(t) >= first][: len(types)]
    assert types[: len(opening)] == opening, types[:6]
    assert types[-4:] == CLOSING + [terminal], types[-5:]
    middle = types[len(opening):-4]
    assert set(middle) <= {"response.output_text.delta"}, set(middle)
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_create_streamed_and_not_with_typed_events(start_server):
    s = start_server("--null-tokens-per-s", "0")
    c = client(s)
    r = c.responses.create(model="null", input="hi", instructions="be brief", max_output_tokens=12,
                           metadata={"run": "1"})
    Response.model_validate(r.to_dict(), strict=False)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == expected_text(12)
    assert r.usage.output_tokens == 12 and r.instructions == "be brief" and r.metadata == {"run": "1"}
    assert r.id.startswith("resp_") and r.output[0].role == "assistant"

    events = list(c.responses.create(model="null", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], max_output_tokens=9, stream=True))
    assert [e.type for e in events][:4] == OPENING
    assert events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected_text(9)
    assert events[-1].response.output_text == expected_text(9)
    assert events[-1].response.usage.total_tokens == events[-1].response.usage.input_tokens + 9

    raw = raw_events(s, "/v1/responses", {"model": "null", "input": "x", "max_output_tokens": 7,
                                          "stream": True})
    assert check_shapes(raw, terminal="response.incomplete") == expected_text(7)
    assert raw[-4]["text"] == expected_text(7)

    # The stored answer reads back as it was streamed.
    rid = raw[0]["response"]["id"]
    back = c.responses.retrieve(rid)
    assert back.output_text == expected_text(7) and back.status == "incomplete"

    for extra, param in [({"tools": [{"type": "web_search"}]}, "tools"),
                         ({"reasoning": {"effort": "high"}}, "reasoning"),
                         ({"input": [{"role": "user", "content": [{"type": "input_image",
                                                                   "image_url": "x"}]}]}, "input")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(**{"model": "null", "input": "x", **extra})
        assert e.value.body["param"] == param, e.value.body


def test_background_resume_same_instance_other_instance_and_after_kill9(start_server, redis):
    """One background response, streamed in three pieces: from its owner A (dropped after a few
    events), from A again with starting_after, from B (sharing the Redis) — then A is killed
    with SIGKILL while B streams; B takes the generation over and its stream goes on. The
    pieces join into exactly the text of an uninterrupted run."""
    n = 240
    common = ("--redis-url", redis.url, "--lease-ms", "1000", "--null-tokens-per-s", "60")
    a = start_server(*common, "--instance-id", "A")
    b = start_server(*common, "--instance-id", "B")
    first = raw_events(a, "/v1/responses", {"model": "null", "input": "tell", "stream": True,
                                            "background": True, "max_output_tokens": n},
                       stop_after=8)
    rid = first[0]["response"]["id"]
    assert first[0]["response"]["background"] is True
    check = [e for e in first]
    # The same instance, after the drop.
    last = first[-1]["sequence_number"]
    again = raw_events(a, f"/v1/responses/{rid}?stream=true&starting_after={last}", stop_after=10)
    assert again[0]["sequence_number"] == last + 1
    check += again
    last = again[-1]["sequence_number"]
    # Another instance, through the SDK; A dies after a few of B's events.
    cb = client(b)
    stream = cb.responses.retrieve(rid, stream=True, starting_after=last)
    rest, killed = [], False
    for ev in stream:
        rest.append(STREAM_EVENT.validate_python(ev.to_dict(), strict=False).to_dict())
        if len(rest) == 5 and not killed:
            a.proc.kill()  # SIGKILL: no drain, no lease release
            killed = True
    assert killed
    check += rest
    text = check_shapes(check, terminal="response.incomplete")
    assert text == expected_text(n)
    assert rest[-1]["response"]["output"][0]["content"][0]["text"] == expected_text(n)
    assert metric_value(b.metrics(), "seedance_takeovers_total") >= 1
    # The final object, on the survivor.
    done = cb.responses.retrieve(rid)
    assert done.status == "incomplete" and done.output_text == expected_text(n)


def test_a_background_id_is_readable_everywhere_once_created(start_server, redis):
    """The `queued` answer comes once the store holds the response: its id, retrieved on
    another instance at once, is found every time (never a 404 that a retry would fix)."""
    common = ("--redis-url", redis.url, "--null-tokens-per-s", "200")
    a = start_server(*common, "--instance-id", "A")
    b = start_server(*common, "--instance-id", "B")
    ca, cb = client(a), client(b)
    for _ in range(30):
        r = ca.responses.create(model="null", input="x", background=True, max_output_tokens=4)
        assert r.status == "queued"
        assert cb.responses.retrieve(r.id).status in ("queued", "in_progress", "incomplete")


def test_background_polled_to_the_end_after_its_owner_died(start_server, redis):
    """Nobody streams it: a plain `retrieve` on B claims the orphaned background response and
    B finishes it (a polling client sees it complete)."""
    common = ("--redis-url", redis.url, "--lease-ms", "1000", "--null-tokens-per-s", "80")
    a = start_server(*common, "--instance-id", "A")
    b = start_server(*common, "--instance-id", "B")
    r = client(a).responses.create(model="null", input="x", background=True, max_output_tokens=120)
    assert r.status == "queued"
    time.sleep(0.3)
    a.proc.kill()
    cb = client(b)
    deadline = time.monotonic() + 20
    while (got := cb.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, got.status
        time.sleep(0.2)
    assert got.status == "incomplete" and got.output_text == expected_text(120)


def test_cancel_delete_expiry_other_key_and_previous_response(start_server):
    s = start_server("--null-tokens-per-s", "100", "--lease-ms", "600", "--resume-ttl-ms", "1500")
    c = client(s)
    bg = c.responses.create(model="null", input="x", background=True, max_output_tokens=2000)
    time.sleep(0.3)
    cancelled = c.responses.cancel(bg.id)
    assert cancelled.status == "cancelled"
    assert 0 < cancelled.usage.output_tokens < 2000
    assert c.responses.retrieve(bg.id).status == "cancelled"

    with pytest.raises(openai.NotFoundError):
        client(s, key="someone-else").responses.retrieve(bg.id)
    with pytest.raises(openai.NotFoundError):
        client(s, key="someone-else").responses.delete(bg.id)

    done = c.responses.create(model="null", input="first", max_output_tokens=4)
    follow_up = c.responses.create(model="null", input="second", previous_response_id=done.id,
                                   max_output_tokens=3)
    assert follow_up.previous_response_id == done.id and follow_up.output_text == expected_text(3)
    # The continued conversation is longer than the new input alone.
    assert follow_up.usage.input_tokens > done.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="null", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"

    c.responses.delete(done.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(done.id)

    # resume_ttl: a stored response expires after its last write.
    time.sleep(3.0)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(follow_up.id)


def test_tenant_keys_see_only_their_responses(start_server, tmp_path):
    sha = lambda k: hashlib.sha256(k.encode()).hexdigest()  # noqa: E731
    f = tmp_path / "tenants.yaml"
    f.write_text(f"""
tenants:
  - id: one
    key_sha256: ["{sha('key-one')}"]
  - id: two
    key_sha256: ["{sha('key-two')}"]
""")
    s = start_server("--tenants-file", str(f), "--null-tokens-per-s", "0")
    r = client(s, "key-one").responses.create(model="null", input="x", max_output_tokens=3)
    assert client(s, "key-one").responses.retrieve(r.id).output_text == expected_text(3)
    with pytest.raises(openai.NotFoundError):
        client(s, "key-two").responses.retrieve(r.id)
    with pytest.raises(openai.AuthenticationError):
        client(s, "no-such-key").responses.retrieve(r.id)


def test_chat_stream_reattached_by_last_event_id(start_server):
    """A plain HTTP client: a resumable chat stream, dropped, reattached with Last-Event-ID."""
    s = start_server("--null-tokens-per-s", "100")
    conn = http.client.HTTPConnection(s.host, s.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "null", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "resumable": True, "max_tokens": 60}), {"content-type": "application/json"})
    resp = conn.getresponse()
    ids, texts, cid = [], [], None
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("id: "):
            ids.append(int(line[4:]))
        elif line.startswith("data: {"):
            v = json.loads(line[6:])
            cid = v["id"]
            texts.append(v["choices"][0]["delta"].get("content") or "")
            if len(texts) == 10:
                break
    conn.sock.close()
    conn = http.client.HTTPConnection(s.host, s.port, timeout=30)
    conn.request("GET", f"/v1/chat/completions/{cid}/stream", headers={"last-event-id": str(ids[-1])})
    resp = conn.getresponse()
    assert resp.status == 200
    more_ids = []
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("id: "):
            more_ids.append(int(line[4:]))
        elif line == "data: [DONE]":
            break
        elif line.startswith("data: {"):
            v = json.loads(line[6:])
            if v["choices"]:
                texts.append(v["choices"][0]["delta"].get("content") or "")
    assert more_ids[0] == ids[-1] + 1
    assert "".join(texts) == expected_text(60)
    # A stream that is not resumable has nothing to reattach to.
    conn = http.client.HTTPConnection(s.host, s.port, timeout=30)
    conn.request("GET", "/v1/chat/completions/chatcmpl-nothing/stream")
    assert conn.getresponse().status == 404


PAGE_JS = """async () => {
  const res = await fetch('/v1/chat/completions', {method: 'POST',
    headers: {'content-type': 'application/json'},
    body: JSON.stringify({model: 'null', messages: [{role: 'user', content: 'x'}],
                          stream: true, resumable: true, max_tokens: N})});
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '', text = '', lastId = 0, id = null;
  const seen = [];
  // Read the POST's own stream until the proxy cuts it.
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        const idm = ev.match(/^id: (\\d+)$/m), data = ev.match(/^data: (.*)$/m);
        if (!data || data[1] === '[DONE]') continue;
        const v = JSON.parse(data[1]); id = v.id;
        const n = idm ? +idm[1] : 0;
        if (n > 0) { seen.push(n); lastId = n; text += v.choices[0].delta.content || ''; }
      }
    }
  } catch (e) {}
  if (!id) return {error: 'no id'};
  return await new Promise((resolve) => {
    let opens = 0;
    const es = new EventSource(`/v1/chat/completions/${id}/stream?last_event_id=${lastId}`);
    es.onopen = () => { opens++; };
    es.onmessage = (m) => {
      if (m.data === '[DONE]') { es.close(); resolve({text, seen, opens, firstPart: lastId}); return; }
      const v = JSON.parse(m.data);
      const n = +m.lastEventId;
      if (v.choices.length && n > 0 && v.choices[0].delta.content !== undefined) {
        seen.push(n); text += v.choices[0].delta.content || '';
      }
    };
    setTimeout(() => { es.close(); resolve({text, seen, opens, timeout: true}); }, 40000);
  });
}"""


def test_eventsource_in_chromium_reconnects_with_last_event_id(start_server):
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not found: scripts/test.sh installs the Debian package")
    from playwright.sync_api import sync_playwright

    n = 150
    s = start_server("--null-tokens-per-s", "40")
    # Every connection through the proxy is reset after 0.8–1.2 s: the fetch and each of
    # EventSource's connections die mid-stream.
    proxy = CuttingProxy((s.host, s.port), lo=0.8, hi=1.2, seed=7)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{proxy.port}/health")
            got = page.evaluate(PAGE_JS.replace("N})", f"{n}}})"))
            browser.close()
    finally:
        proxy.close()
    assert "error" not in got and not got.get("timeout"), got
    assert got["text"] == expected_text(n)
    assert got["seen"] == list(range(1, len(got["seen"]) + 1)), got["seen"]
    assert got["firstPart"] > 0
    # EventSource itself reconnected (its connections were cut too), sending Last-Event-ID.
    assert got["opens"] >= 2, got


def test_a_background_response_followed_over_the_websocket(start_server, redis):
    """One log, three views: a background response is followed over the WebSocket protocol on
    another instance (`resume` with session = id = the response id, token = the API key): the
    same text as the Responses object, seqs 1..n then the `done`; another key is refused."""
    import asyncio

    from conftest import run
    from resumelib import Resumed, connect, recv_until

    common = ("--redis-url", redis.url, "--null-tokens-per-s", "100")
    a = start_server(*common, "--instance-id", "A")
    b = start_server(*common, "--instance-id", "B")
    r = client(a).responses.create(model="null", input="x", background=True, max_output_tokens=60)

    async def follow(token: str, after: int) -> tuple[Resumed, dict | None]:
        ws, _ = await connect(b.ws_url)
        await ws.send(json.dumps({"type": "resume", "session": r.id, "id": r.id, "token": token,
                                  "after": after}))
        got = Resumed()
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if first["type"] == "error":
            await ws.close()
            return got, first
        got.msgs.append(first)
        assert first["type"] == "done" or await recv_until(ws, got, 30)
        await ws.close()
        return got, None

    got, err = run(follow("key-1", 0))
    assert err is None
    got.assert_exact()
    assert got.text.strip() == expected_text(60)
    assert got.done["usage"]["completion_tokens"] == 60
    final = client(b).responses.retrieve(r.id)
    assert final.output_text == got.text
    # From the middle: only what follows seq 20.
    tail, _ = run(follow("key-1", 20))
    assert [m["seq"] for m in tail.msgs] == [m["seq"] for m in got.msgs if m["seq"] > 20]
    _, err = run(follow("key-2", 0))
    assert err is not None and err["code"] == "bad_token", err
