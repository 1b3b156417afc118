"""The WebSocket protocol of SPEC 4 through the Python `websockets` client (asyncio)."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import WORDS, expected_text, run
from wsclient import BOUNDARY, collect, gen_msg, generate, open_ws, recv_json, session_of

# ---------------------------------------------------------------- session


def test_session_message_fields(server):
    async def main():
        async with open_ws(server) as ws, open_ws(server) as ws2:
            m, m2 = await session_of(ws), await session_of(ws2)
            for k in ("session", "token", "heartbeat_ms", "window", "model", "stream_mode"):
                assert k in m, m
            assert m["session"].startswith("s-") and len(m["session"]) > 2
            assert isinstance(m["token"], str) and len(m["token"]) >= 16
            assert m["heartbeat_ms"] == 15000
            assert m["window"] == 65536
            assert m["model"] == "null"
            assert m["stream_mode"] == "chunk"  # the default
            assert m["session"] != m2["session"] and m["token"] != m2["token"]
            # The upgrade carried no subprotocol and no compression we did not ask for.
            assert ws.subprotocol is None
            assert ws.response.status_code == 101

    run(main())


@pytest.mark.parametrize(
    "query,headers,mode",
    [
        ("?stream_mode=token", None, "token"),
        ("", {"X-Stream-Mode": "full"}, "full"),
        ("?stream_mode=token", {"X-Stream-Mode": "full"}, "full"),  # the header wins
        ("?model=null", None, "chunk"),
        ("", {"X-Model-ID": "null"}, "chunk"),
    ],
)
def test_handshake_options_reach_the_session(server, query, headers, mode):
    async def main():
        async with open_ws(server, query, headers) as ws:
            m = await session_of(ws)
            assert m["stream_mode"] == mode and m["model"] == "null"

    run(main())


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("mode", ["token", "chunk", "full"])
@pytest.mark.parametrize("n", [1, 9, 64, 200])
def test_stream_modes_exact_text(server, mode, n):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            s = await generate(ws, "c1", n, mode, prompt="one two three")
            s.check_order()
            assert s.text == expected_text(n)
            d = s.done
            assert d["type"] == "done" and d["id"] == "c1"
            assert d["finish_reason"] == "length"
            assert d["usage"] == {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            assert set(d["timings"]) >= {"ttft_ms", "tokens_per_s"}
            assert d["timings"]["ttft_ms"] >= 0 and d["timings"]["tokens_per_s"] >= 0
            if mode == "token":
                # One delta per word, each word with its leading space.
                assert [x["text"] for x in s.deltas] == [(" " if i else "") + w for i, w in enumerate(WORDS[:n])]
            elif mode == "full":
                assert len(s.deltas) == 1
            else:
                # Chunks end at punctuation: a boundary only ever ends a chunk.
                for x in s.deltas:
                    body = x["text"].rstrip(" ")
                    assert not BOUNDARY.search(body[:-1]), f"chunk not cut after punctuation: {x['text']!r}"
                if n >= 64:
                    assert len(s.deltas) < n
                    assert s.deltas[0]["text"] == "The river town woke slowly that autumn morning,"

    run(main())


def test_chunk_mode_latency_cap(slow_server):
    """At 100 tokens/s the clauses of the text (8 to 10 words, 70 to 90 ms) outlast the 50 ms
    latency cap, so some chunks go out before their punctuation; nothing is lost or reordered."""

    async def main():
        async with open_ws(slow_server) as ws:
            await session_of(ws)
            s = await generate(ws, "c", 40, "chunk")
            s.check_order()
            assert s.text == expected_text(40)
            texts = [d["text"] for d in s.deltas]
            assert 1 < len(texts) < 40
            for t in texts:
                assert not BOUNDARY.search(t.rstrip(" ")[:-1]), f"chunk not cut after punctuation: {t!r}"
            early = [t for t in texts[:-1] if not BOUNDARY.search(t.rstrip(" ")[-1:])]
            assert early, f"the latency cap never cut a chunk: {texts}"

    run(main())


def test_null_model_gives_any_max_tokens_by_starting_its_text_over(server):
    """Asking for more tokens than the text has: the text again from its start, exactly
    max_tokens of them, finish_reason length (a benchmark asking for N tokens gets N)."""

    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            n = 2 * len(WORDS) + 5
            for mode in ("token", "chunk", "full"):
                s = await generate(ws, f"all-{mode}", n, mode)
                s.check_order()
                assert s.text == expected_text(n)
                assert s.text.startswith(" ".join(WORDS) + " " + " ".join(WORDS) + " " + WORDS[0])
                assert s.done["finish_reason"] == "length"
                assert s.done["usage"]["completion_tokens"] == n

    run(main())


def test_default_max_tokens_is_256(server):
    async def main():
        async with open_ws(server, "?stream_mode=token") as ws:
            await session_of(ws)
            s = await generate(ws, "d", None, None)
            s.check_order()
            assert len(s.deltas) == 256 and s.text == expected_text(256)
            assert s.done["finish_reason"] == "length"

    run(main())


def test_connection_mode_and_per_request_override(server):
    async def main():
        async with open_ws(server, headers={"X-Stream-Mode": "full"}) as ws:
            await session_of(ws)
            s = await generate(ws, "a", 20)
            assert len(s.deltas) == 1 and s.text == expected_text(20)
            s = await generate(ws, "b", 20, "token")
            assert len(s.deltas) == 20 and s.text == expected_text(20)

    run(main())


def test_messages_input(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            msgs = [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi there"}]},
            ]
            await ws.send(json.dumps({"type": "generate", "id": "m", "messages": msgs, "max_tokens": 12}))
            s = (await collect(ws, ["m"]))["m"]
            s.check_order()
            assert s.text == expected_text(12)
            assert s.done["usage"]["prompt_tokens"] > 0
            assert s.done["usage"]["completion_tokens"] == 12

    run(main())


def test_ids_are_echoed_exactly(server):
    """Ids with quotes, backslashes, control characters and non-ASCII come back byte for byte."""

    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            for rid in ['q"uote', "back\\slash", "tab\there\nnl", "ünï-çødé ✓", "x" * 128]:
                s = await generate(ws, rid, 3, "token")
                s.check_order()
                assert s.text == expected_text(3)

    run(main())


def test_unicode_prompt_and_large_prompt(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            s = await generate(ws, "u", 5, "token", prompt="你好，世界。 Привет мир 🌍")
            assert s.text == expected_text(5)
            big = "word " * 100_000  # 500 KB, one frame below the 1 MiB frame limit
            s = await generate(ws, "big", 5, "token", prompt=big)
            assert s.text == expected_text(5)
            assert s.done["usage"]["prompt_tokens"] == 100_000

    run(main())


def test_fragmented_client_message(server):
    """A text message sent as several frames (websockets fragments an iterable)."""

    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            parts = ['{"type":"generate",', '"id":"frag","prompt":"hi",', '"max_tokens":4,"stream_mode":"token"}']
            await ws.send(parts)
            s = (await collect(ws, ["frag"]))["frag"]
            s.check_order()
            assert s.text == expected_text(4)

    run(main())


# ---------------------------------------------------------------- concurrency on one connection


def test_concurrent_generations_one_connection(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            plan = {f"r{i}": (5 + 13 * i, ("token", "chunk", "full")[i % 3]) for i in range(12)}
            for rid, (n, mode) in plan.items():
                await ws.send(gen_msg(rid, n, mode))
            streams = await collect(ws, list(plan))
            for rid, (n, _) in plan.items():
                s = streams[rid]
                assert not s.errors, s.errors
                s.check_order()
                assert s.text == expected_text(n), rid
                assert s.done["usage"]["completion_tokens"] == n

    run(main())


def test_concurrent_generations_interleave(slow_server):
    """Paced generations on one connection run side by side: their deltas interleave."""

    async def main():
        async with open_ws(slow_server, "?stream_mode=token") as ws:
            await session_of(ws)
            ids = ["a", "b", "c"]
            for rid in ids:
                await ws.send(gen_msg(rid, 15))
            order: list = []
            streams = await collect(ws, ids, order)
            for rid in ids:
                streams[rid].check_order()
                assert streams[rid].text == expected_text(15)
            first_done = next(i for i, m in enumerate(order) if m["type"] == "done")
            seen_before_done = {m["id"] for m in order[:first_done] if m["type"] == "delta"}
            assert seen_before_done == set(ids), "generations ran one after another, not concurrently"

    run(main())


def test_connection_limit_on_concurrent_requests(slow_server):
    """More than max_requests_per_connection (64) at once: the extra one is refused cleanly."""

    async def main():
        async with open_ws(slow_server, "?stream_mode=full") as ws:
            await session_of(ws)
            for i in range(65):
                await ws.send(gen_msg(f"g{i}", 300))
            m = await recv_json(ws)
            assert m["type"] == "error" and m["code"] == "too_many_requests" and m["id"] == "g64", m
            for i in range(64):
                await ws.send(json.dumps({"type": "cancel", "id": f"g{i}"}))
            streams = await collect(ws, [f"g{i}" for i in range(64)])
            assert all(s.done["finish_reason"] == "cancelled" for s in streams.values())

    run(main())


# ---------------------------------------------------------------- cancel


def test_cancel_mid_stream(slow_server):
    async def main():
        async with open_ws(slow_server) as ws:
            await session_of(ws)
            await ws.send(gen_msg("c1", 300, "token"))
            deltas = []
            while len(deltas) < 3:
                m = await recv_json(ws)
                assert m["type"] == "delta", m
                deltas.append(m)
            await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
            rest = (await collect(ws, ["c1"]))["c1"]
            rest.deltas[:0] = deltas
            rest.check_order()
            assert rest.done["finish_reason"] == "cancelled"
            assert 3 <= len(rest.deltas) < 300
            assert rest.text == expected_text(len(rest.deltas))
            assert rest.done["usage"]["completion_tokens"] >= len(rest.deltas)
            # Nothing more for c1 arrives after done; the id can be reused.
            await ws.send(json.dumps({"type": "ping"}))
            assert await recv_json(ws) == {"type": "pong"}
            await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
            m = await recv_json(ws)
            assert m["type"] == "error" and m["code"] == "unknown_id" and m["id"] == "c1"
            s = await generate(ws, "c1", 3, "token")
            assert s.text == expected_text(3)

    run(main())


@pytest.mark.parametrize("mode", ["chunk", "full"])
def test_cancel_in_buffered_modes(slow_server, mode):
    """Cancelling a chunk/full stream still delivers what was generated, then done cancelled."""

    async def main():
        async with open_ws(slow_server) as ws:
            await session_of(ws)
            await ws.send(gen_msg("x", 300, mode))
            await asyncio.sleep(0.15)
            await ws.send(json.dumps({"type": "cancel", "id": "x"}))
            s = (await collect(ws, ["x"]))["x"]
            s.check_order()
            assert s.done["finish_reason"] == "cancelled"
            n = s.done["usage"]["completion_tokens"]
            assert 0 < n < 300
            assert s.text == expected_text(n)

    run(main())


def test_cancel_one_of_several(slow_server):
    async def main():
        async with open_ws(slow_server, "?stream_mode=token") as ws:
            await session_of(ws)
            await ws.send(gen_msg("keep", 20))
            await ws.send(gen_msg("drop", 300))
            await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "cancel", "id": "drop"}))
            streams = await collect(ws, ["keep", "drop"])
            assert streams["keep"].done["finish_reason"] == "length"
            assert streams["keep"].text == expected_text(20)
            assert streams["drop"].done["finish_reason"] == "cancelled"
            streams["drop"].check_order()

    run(main())


def test_cancel_unknown_id(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            await ws.send(json.dumps({"type": "cancel", "id": "nothing"}))
            m = await recv_json(ws)
            assert m["type"] == "error" and m["code"] == "unknown_id" and m["id"] == "nothing", m
            assert m["message"]

    run(main())


# ---------------------------------------------------------------- bad messages


BAD = [
    ("{nope", "bad_json", None),
    ("", "bad_json", None),
    ("[1,2,3]", "bad_json", None),
    ('"generate"', "bad_json", None),
    ('{"type":"launch","id":"x1"}', "unknown_type", "x1"),
    ('{"id":"x2"}', "missing_field", "x2"),
    ('{"type":7,"id":"x3"}', "invalid_field", "x3"),
    ('{"type":"generate","prompt":"hi"}', "missing_field", None),
    ('{"type":"generate","id":"","prompt":"hi"}', "invalid_field", ""),
    ('{"type":"generate","id":42,"prompt":"hi"}', "invalid_field", None),
    ('{"type":"generate","id":"x4","prompt":"hi","max_tokens":-3}', "invalid_field", "x4"),
    ('{"type":"generate","id":"x5","prompt":"hi","max_tokens":0}', "invalid_field", "x5"),
    ('{"type":"generate","id":"x6","prompt":"hi","max_tokens":"5"}', "invalid_field", "x6"),
    ('{"type":"generate","id":"x7","prompt":"hi","max_tokens":1.5}', "invalid_field", "x7"),
    ('{"type":"generate","id":"x8","prompt":"hi","max_tokens":99999999}', "invalid_field", "x8"),
    ('{"type":"generate","id":"x9"}', "missing_field", "x9"),
    ('{"type":"generate","id":"x10","prompt":"a","messages":[{"role":"user","content":"b"}]}', "invalid_field", "x10"),
    ('{"type":"generate","id":"x11","messages":[]}', "invalid_field", "x11"),
    ('{"type":"generate","id":"x12","messages":[{"role":"wizard","content":"b"}]}', "invalid_field", "x12"),
    ('{"type":"generate","id":"x13","prompt":"hi","stream_mode":"bits"}', "invalid_field", "x13"),
    ('{"type":"generate","id":"x14","prompt":"hi","temperature":"hot"}', "invalid_field", "x14"),
    ('{"type":"generate","id":"x15","prompt":"hi","top_p":0}', "invalid_field", "x15"),
    ('{"type":"generate","id":"x16","prompt":"hi","model":"gpt-4o"}', "model_not_found", "x16"),
    ('{"type":"generate","id":"x17","prompt":42}', "invalid_field", "x17"),
    ('{"type":"cancel"}', "missing_field", None),
    ('{"type":"window_update","bytes":0}', "invalid_field", None),
]


@pytest.mark.parametrize("payload,code,rid", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_message_gets_error_and_connection_stays(server, payload, code, rid):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            await ws.send(payload)
            m = await recv_json(ws)
            assert m["type"] == "error", m
            assert m["code"] == code, m
            assert m.get("id") == rid, m
            assert isinstance(m["message"], str) and m["message"], m
            if "max_tokens" in payload:
                assert "max_tokens" in m["message"]
            # Still open and serving.
            s = await generate(ws, "after", 5, "token")
            s.check_order()
            assert s.text == expected_text(5)

    run(main())


def test_many_errors_in_a_row_then_generate(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            for payload, code, _ in BAD:
                await ws.send(payload)
            codes = [(await recv_json(ws))["code"] for _ in BAD]
            assert codes == [c for _, c, _ in BAD]
            assert (await generate(ws, "ok", 7, "token")).text == expected_text(7)

    run(main())


def test_duplicate_running_id(slow_server):
    async def main():
        async with open_ws(slow_server, "?stream_mode=token") as ws:
            await session_of(ws)
            await ws.send(gen_msg("dup", 300))
            await ws.send(gen_msg("dup", 5))
            first_error = None
            deltas = []
            while first_error is None:
                m = await recv_json(ws)
                if m["type"] == "error":
                    first_error = m
                else:
                    assert m["type"] == "delta" and m["id"] == "dup", m
                    deltas.append(m)
            assert first_error["code"] == "duplicate_id" and first_error["id"] == "dup", first_error
            await ws.send(json.dumps({"type": "cancel", "id": "dup"}))
            s = (await collect(ws, ["dup"]))["dup"]
            s.deltas[:0] = deltas
            s.check_order()
            assert s.done["finish_reason"] == "cancelled"
            # The first generation went on undisturbed by the refused duplicate.
            assert s.text == expected_text(len(s.deltas))

    run(main())


def test_binary_frame_gets_error(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            await ws.send(b'{"type":"ping"}')
            m = await recv_json(ws)
            assert m["type"] == "error" and m["code"] == "binary_not_supported", m
            s = await generate(ws, "after", 5, "token")
            assert s.text == expected_text(5)

    run(main())


def test_resume_of_unknown_session_is_an_error(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            await ws.send(json.dumps({"type": "resume", "session": "s-nope", "token": "t", "id": "a", "after": 3}))
            m = await recv_json(ws)
            assert m["type"] == "error" and m["code"] == "unknown_session", m
            await ws.send(json.dumps({"type": "ack", "id": "zz", "seq": 1}))
            await ws.send(json.dumps({"type": "window_update", "bytes": 65536}))
            await ws.send(json.dumps({"type": "ping"}))
            assert await recv_json(ws) == {"type": "pong"}

    run(main())


# ---------------------------------------------------------------- ping / pong / close


def test_app_level_ping_pong(server):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            for _ in range(3):
                await ws.send('{"type":"ping"}')
                assert await recv_json(ws) == {"type": "pong"}

    run(main())


def test_ws_protocol_ping_answered(server):
    async def main():
        async with open_ws(server, ping_interval=None) as ws:
            await session_of(ws)
            for payload in (b"", b"hello", bytes(range(125))):
                waiter = await ws.ping(payload)
                latency = await asyncio.wait_for(waiter, 5)
                assert latency >= 0

    run(main())


def test_ws_ping_during_stream(slow_server):
    async def main():
        async with open_ws(slow_server, "?stream_mode=token", ping_interval=None) as ws:
            await session_of(ws)
            await ws.send(gen_msg("p", 20))
            waiter = await ws.ping(b"mid-stream")
            s = (await collect(ws, ["p"]))["p"]
            await asyncio.wait_for(waiter, 5)
            s.check_order()
            assert s.text == expected_text(20)

    run(main())


@pytest.mark.parametrize("code,reason", [(1000, ""), (1001, "leaving"), (4000, "app code")])
def test_client_close_handshake(server, code, reason):
    async def main():
        async with open_ws(server) as ws:
            await session_of(ws)
            await ws.close(code, reason)
            rcvd = ws.protocol.close_rcvd
            assert rcvd is not None, "server did not answer the close frame"
            assert rcvd.code in (1000, code), rcvd
            assert ws.protocol.close_rcvd_then_sent is False  # we sent first, the server echoed

    run(main())


def test_client_close_mid_generation(slow_server):
    async def main():
        async with open_ws(slow_server, "?stream_mode=token") as ws:
            await session_of(ws)
            await ws.send(gen_msg("gone", 300))
            await recv_json(ws)
            await ws.close()
            assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
        # The server is still fine.
        async with open_ws(slow_server, "?stream_mode=full") as ws:
            await session_of(ws)
            assert (await generate(ws, "next", 5)).text == expected_text(5)

    run(main())


def test_oversized_frame_closes_1009(server):
    """A 2 MiB text frame is over the 1 MiB frame limit: close 1009, checked from the header.
    (Uncompressed: deflated, those 2 MiB of `x` would be a 2 KB frame; the limit on what a
    compressed message inflates to is in test_deflate.py.)"""

    async def main():
        async with open_ws(server, max_size=None, compression=None) as ws:
            await session_of(ws)
            await ws.send(gen_msg("huge", 5, prompt="x" * (2 << 20)))
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    await ws.recv()
            assert e.value.rcvd is not None and e.value.rcvd.code == 1009, e.value

    run(main())


# ---------------------------------------------------------------- handshake errors via websockets


@pytest.mark.parametrize(
    "query,headers,status,code",
    [
        ("?model=gpt-4o", None, 404, "model_not_found"),
        ("", {"X-Model-ID": "no-such-model"}, 404, "model_not_found"),
        ("?model=a!", None, 400, "bad_model_id"),
        ("", {"X-Model-ID": "ab"}, 400, "bad_model_id"),
        ("?stream_mode=bits", None, 400, "bad_stream_mode"),
        ("", {"X-Stream-Mode": "TOKEN"}, 400, "bad_stream_mode"),
        ("?compression=gzip", None, 400, "bad_compression"),
        ("?initial_window=10", None, 400, "bad_window"),
        ("", {"X-Initial-Window": "4294967296"}, 400, "bad_window"),
        ("?flow_control=tcp", None, 400, "bad_window"),
    ],
)
def test_handshake_refused_invalid_status(server, query, headers, status, code):
    async def main():
        with pytest.raises(InvalidStatus) as e:
            async with open_ws(server, query, headers):
                pass
        r = e.value.response
        assert r.status_code == status
        assert r.headers["Content-Type"].startswith("application/json")
        body = json.loads(r.body)
        assert body["error"]["code"] == code and body["error"]["message"]

    run(main())

