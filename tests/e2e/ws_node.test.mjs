// The WebSocket protocol of SPEC 4 through the Node `ws` client (node:test).
//
// Starts seedance-server ($SEEDANCE_BIN, default target/debug/seedance-server) with the paced
// null model on 127.0.0.1:0, reads the address from its `listening on ADDR` line, and stops it
// with SIGTERM at the end (expecting exit status 0).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.resolve(repo, process.env.SEEDANCE_BIN ?? 'target/debug/seedance-server');

// The null model's text, one word per token (mirrors src/engine/null.rs; the Python suite checks
// the full text, this suite only needs its first words).
const WORDS = ('The river town woke slowly that autumn morning, and the baker was the first to ' +
  'open his shutters. Steam rose from the loaves he set on the sill, and the smell drifted down ' +
  'the lane toward the harbour where the fishing boats were coming in. A boy ran along the quay ' +
  'with a basket of rope, calling to his father, who waved from the deck of a blue boat with a ' +
  'patched sail.').split(' ');
const expected = (n) => WORDS.slice(0, n).join(' ');

let server;
let url;
const stderr = [];

before(async () => {
  // 200 tokens/s per sequence: a 300-token generation lasts 1.5 s, long enough to cancel.
  server = spawn(bin, ['--model', 'null', '--listen', '127.0.0.1:0', '--cores', '2',
    '--null-tokens-per-s', '200'], { stdio: ['ignore', 'ignore', 'pipe'] });
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "listening on" line:\n${stderr.join('\n')}`)), 30000);
    server.on('error', reject);
    server.on('exit', (code) => reject(new Error(`server exited ${code}:\n${stderr.join('\n')}`)));
    createInterface({ input: server.stderr }).on('line', (line) => {
      stderr.push(line);
      const m = /^listening on (\S+)$/.exec(line);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
  });
  url = `ws://${addr}/v1/chat`;
});

after(async () => {
  if (!server || server.exitCode !== null) return;
  const exited = new Promise((resolve) => server.once('exit', (code, sig) => resolve({ code, sig })));
  server.kill('SIGTERM');
  const timer = setTimeout(() => server.kill('SIGKILL'), 20000);
  const { code, sig } = await exited;
  clearTimeout(timer);
  assert.equal(code, 0, `server exit ${code} ${sig}:\n${stderr.join('\n')}`);
});

/** Opens a connection and resolves once the `session` message arrived. */
function open(query = '', options = undefined) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url + query, options);
    ws.once('upgrade', (res) => { ws.answer = res.headers; });
    const inbox = [];
    const waiters = [];
    ws.on('message', (data, isBinary) => {
      assert.equal(isBinary, false, 'server sent a binary frame');
      const msg = JSON.parse(data.toString('utf8'));
      const w = waiters.shift();
      if (w) w(msg); else inbox.push(msg);
    });
    ws.once('error', reject);
    /** Next message (in order). */
    ws.next = () => new Promise((res, rej) => {
      if (inbox.length) return res(inbox.shift());
      const t = setTimeout(() => rej(new Error('timed out waiting for a message')), 20000);
      waiters.push((m) => { clearTimeout(t); res(m); });
    });
    ws.send_json = (obj) => ws.send(JSON.stringify(obj));
    ws.once('open', async () => {
      const s = await ws.next();
      assert.equal(s.type, 'session');
      resolve(ws);
    });
  });
}

/** Reads until every id has its `done`; checks per-id order (seq 1..n, done n+1). */
async function collect(ws, ids, order = [], already = []) {
  const streams = Object.fromEntries(ids.map((id) => [id, { deltas: [], done: null }]));
  let pending = ids.length;
  while (pending > 0) {
    const m = already.length > 0 ? already.shift() : await ws.next();
    order.push(m);
    assert.ok(m.id in streams, `unexpected message ${JSON.stringify(m)}`);
    const s = streams[m.id];
    assert.equal(s.done, null, `message after done: ${JSON.stringify(m)}`);
    if (m.type === 'delta') {
      assert.equal(m.seq, s.deltas.length + 1, `${m.id}: seq out of order`);
      s.deltas.push(m);
    } else if (m.type === 'done') {
      assert.equal(m.seq, s.deltas.length + 1, `${m.id}: done seq`);
      s.done = m;
      pending -= 1;
    } else {
      assert.fail(`unexpected message ${JSON.stringify(m)}`);
    }
  }
  for (const s of Object.values(streams)) s.text = s.deltas.map((d) => d.text).join('');
  return streams;
}

function closed(ws) {
  return new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
}

test('streams a generation in token, chunk and full modes', async () => {
  const ws = await open();
  for (const mode of ['token', 'chunk', 'full']) {
    ws.send_json({ type: 'generate', id: `s-${mode}`, prompt: 'hello there', max_tokens: 24, stream_mode: mode });
    const { [`s-${mode}`]: s } = await collect(ws, [`s-${mode}`]);
    assert.equal(s.text, expected(24));
    assert.equal(s.done.finish_reason, 'length');
    assert.deepEqual(s.done.usage, { prompt_tokens: 2, completion_tokens: 24, total_tokens: 26 });
    if (mode === 'token') assert.equal(s.deltas.length, 24);
    if (mode === 'full') assert.equal(s.deltas.length, 1);
  }
  // An empty close frame is answered with an empty one: ws reports 1005 (no status).
  const c = closed(ws);
  ws.close();
  assert.equal((await c).code, 1005);
});

test('cancel mid-stream', async () => {
  const ws = await open('?stream_mode=token');
  ws.send_json({ type: 'generate', id: 'c1', prompt: 'go', max_tokens: 300 });
  const first = [];
  while (first.length < 3) {
    const m = await ws.next();
    assert.equal(m.type, 'delta');
    first.push(m);
  }
  ws.send_json({ type: 'cancel', id: 'c1' });
  const { c1 } = await collect(ws, ['c1'], [], first);
  assert.equal(c1.done.finish_reason, 'cancelled');
  assert.ok(c1.deltas.length >= 3 && c1.deltas.length < 300, `${c1.deltas.length} deltas`);
  assert.equal(c1.text, expected(c1.deltas.length));
  // A cancel of nothing is an error, not a dropped connection.
  ws.send_json({ type: 'cancel', id: 'c1' });
  const e = await ws.next();
  assert.equal(e.type, 'error');
  assert.equal(e.code, 'unknown_id');
  assert.equal(e.id, 'c1');
  ws.close();
  await closed(ws);
});

test('bad JSON gets an error and the connection keeps serving', async () => {
  const ws = await open('?stream_mode=full');
  ws.send('{"type": "generate", oops');
  const e = await ws.next();
  assert.equal(e.type, 'error');
  assert.equal(e.code, 'bad_json');
  assert.ok(e.message.length > 0);
  ws.send_json({ type: 'generate', id: 'after', prompt: 'x', max_tokens: 5 });
  const { after: s } = await collect(ws, ['after']);
  assert.equal(s.text, expected(5));
  ws.send_json({ type: 'ping' });
  assert.deepEqual(await ws.next(), { type: 'pong' });
  ws.close();
  await closed(ws);
});

test('concurrent requests on one connection interleave and complete in order', async () => {
  const ws = await open('?stream_mode=token');
  const plan = { a: 20, b: 30, c: 10, d: 25 };
  for (const [id, n] of Object.entries(plan)) {
    ws.send_json({ type: 'generate', id, prompt: 'p', max_tokens: n });
  }
  const order = [];
  const streams = await collect(ws, Object.keys(plan), order);
  for (const [id, n] of Object.entries(plan)) {
    assert.equal(streams[id].text, expected(n), id);
    assert.equal(streams[id].done.usage.completion_tokens, n);
  }
  const firstDone = order.findIndex((m) => m.type === 'done');
  const before = new Set(order.slice(0, firstDone).filter((m) => m.type === 'delta').map((m) => m.id));
  assert.deepEqual([...before].sort(), Object.keys(plan).sort(), 'streams did not interleave');
  ws.close();
  await closed(ws);
});

test('close handshake: client close 1000 is answered with 1000', async () => {
  const ws = await open();
  ws.send_json({ type: 'generate', id: 'bye', prompt: 'p', max_tokens: 300, stream_mode: 'token' });
  await ws.next();
  const c = closed(ws);
  ws.close(1000, 'done here');
  const { code } = await c;
  assert.equal(code, 1000);
});

test('WebSocket ping frame is answered by a pong with the same payload', async () => {
  const ws = await open();
  const pong = new Promise((resolve) => ws.once('pong', (data) => resolve(data.toString())));
  ws.ping('node-ping');
  assert.equal(await pong, 'node-ping');
  ws.close();
  await closed(ws);
});

// A masked-frame violation (an unmasked client frame) cannot be produced with `ws`: it always
// masks client frames. Raw-byte protocol violations are covered by the Python raw-frame tests.
/** One sample of the server's Prometheus metrics. */
async function metric(name) {
  const text = await (await fetch(url.replace('ws://', 'http://').replace('/v1/chat', '/metrics'))).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  assert.ok(line, `metric ${name} missing`);
  return Number(line.split(' ').pop());
}

const DEFLATE_IN = 'seedance_compression_input_bytes_total{codec="deflate"}';

test('permessage-deflate: negotiated, server messages inflated, compressed client messages understood', async () => {
  const before = await metric(DEFLATE_IN);
  // threshold 0: ws compresses every message it sends (by default only those over 1 KiB).
  const ws = await open('?stream_mode=token', { perMessageDeflate: { threshold: 0 } });
  assert.equal(ws.extensions, 'permessage-deflate');
  assert.equal(ws.answer['sec-websocket-extensions'], 'permessage-deflate; client_no_context_takeover');
  for (const [id, n] of [['d1', 60], ['d2', 5]]) {
    ws.send_json({ type: 'generate', id, prompt: 'tell me '.repeat(500), max_tokens: n });
    const { [id]: s } = await collect(ws, [id]);
    assert.equal(s.text, expected(n));
    assert.equal(s.deltas.length, n);
  }
  assert.ok(await metric(DEFLATE_IN) > before, 'the server deflated its messages');
  const c = closed(ws);
  ws.close(1000);
  assert.equal((await c).code, 1000);
});

test('permessage-deflate: no context takeover both ways and a 9-bit server window', async () => {
  const ws = await open('?stream_mode=chunk', {
    perMessageDeflate: {
      threshold: 0, serverNoContextTakeover: true, clientNoContextTakeover: true, serverMaxWindowBits: 9,
    },
  });
  assert.equal(ws.extensions, 'permessage-deflate');
  assert.equal(ws.answer['sec-websocket-extensions'],
    'permessage-deflate; client_no_context_takeover; server_no_context_takeover; server_max_window_bits=9');
  ws.send_json({ type: 'generate', id: 'n', prompt: 'hi', max_tokens: 50 });
  ws.send_json({ type: 'generate', id: 'm', prompt: 'hi', max_tokens: 30 });
  const s = await collect(ws, ['n', 'm']);
  assert.equal(s.n.text, expected(50));
  assert.equal(s.m.text, expected(30));
  ws.close();
});

test('permessage-deflate offer with window bits 8 is declined: plain frames, reason in session', async () => {
  const ws = new WebSocket(url, { perMessageDeflate: { serverMaxWindowBits: 8 } });
  const session = await new Promise((resolve, reject) => {
    ws.once('message', (data) => resolve(JSON.parse(data.toString('utf8'))));
    ws.once('error', reject);
  });
  assert.equal(ws.extensions, '');
  assert.equal(session.compression, 'none');
  assert.match(session.compression_declined, /server_max_window_bits=8/);
  ws.close();
});

test('unmasked client frame (not producible with ws)', { skip: 'ws always masks client frames' }, () => {});
