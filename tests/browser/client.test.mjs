// Unit tests of the browser client (src/web/client.js, served as /client.js), with Node's
// own test runner and no packages: the event parser at every possible chunk boundary, and
// ask() / getQuota() against a fake fetch.
//
//   node --test tests/browser/client.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { EventStreamParser, ask, getQuota } from '../../src/web/client.js';

const encoder = new TextEncoder();

/** A stream as the server sends it: tokens with multi-byte text, a heartbeat, done. */
const TOKENS = ['naïve', ' café', ' –', ' 日本語', ' Ωmega', ' ✓', ' 🚀', ' <script>alert(1)</script>'];
const DONE = { type: 'done', queryId: 'q1', sources: [{ id: 'i18n.md#1', title: 'I18n', score: 1.5 }], quotaRemaining: 2 };
const STREAM =
  TOKENS.map((token) => `data: ${JSON.stringify({ type: 'token', token })}\n\n`).join('') +
  ': keep-alive\n\n' +
  'data:\n\n' +
  'data:   \n\n' +
  `data: ${JSON.stringify(DONE)}\n\n`;
const EXPECTED = [...TOKENS.map((token) => ({ type: 'token', token })), DONE];

function parseChunks(chunks) {
  const parser = new EventStreamParser();
  const events = [];
  for (const chunk of chunks) events.push(...parser.push(chunk));
  events.push(...parser.end());
  return events;
}

test('the stream in one chunk gives every event, comments and blank data ignored', () => {
  assert.deepEqual(parseChunks([encoder.encode(STREAM)]), EXPECTED);
});

test('a split at every byte, including inside multi-byte characters, changes nothing', () => {
  const bytes = encoder.encode(STREAM);
  for (let at = 0; at <= bytes.length; at++) {
    const events = parseChunks([bytes.subarray(0, at), bytes.subarray(at)]);
    assert.deepEqual(events, EXPECTED, `split at byte ${at}`);
  }
});

test('one byte per chunk changes nothing', () => {
  const bytes = encoder.encode(STREAM);
  const chunks = Array.from(bytes, (_, i) => bytes.subarray(i, i + 1));
  assert.deepEqual(parseChunks(chunks), EXPECTED);
});

test('CRLF and CR line endings work, also with CR and LF in different chunks', () => {
  for (const eol of ['\r\n', '\r']) {
    const bytes = encoder.encode(STREAM.replaceAll('\n', eol));
    for (let at = 0; at <= bytes.length; at++) {
      const events = parseChunks([bytes.subarray(0, at), bytes.subarray(at)]);
      assert.deepEqual(events, EXPECTED, `${JSON.stringify(eol)}, split at byte ${at}`);
    }
  }
});

test('a CRLF split between chunks is one line break, not two (an event is not cut short)', () => {
  const bytes = encoder.encode('data: {"type":"token",\r\ndata: "token":"x"}\r\n\r\n');
  for (let at = 0; at <= bytes.length; at++) {
    const events = parseChunks([bytes.subarray(0, at), bytes.subarray(at)]);
    assert.deepEqual(events, [{ type: 'token', token: 'x' }], `split at byte ${at}`);
  }
});

test('multi-line data is joined with a newline; other fields and "data" without a space work', () => {
  const text = 'event: message\nid: 7\nretry: 1000\ndata: {"type":"token",\ndata:"token":"x"}\n\n';
  assert.deepEqual(parseChunks([text]), [{ type: 'token', token: 'x' }]);
});

test('an event that never gets its blank line is dropped at the end', () => {
  assert.deepEqual(parseChunks(['data: {"type":"token","token":"a"}\n\ndata: {"type":"tok']), [
    { type: 'token', token: 'a' },
  ]);
});

test('data that is not JSON is an error', () => {
  assert.throws(() => parseChunks(['data: <html>\n\n']), SyntaxError);
});

// ---------------------------------------------------------------------------------------
// ask() and getQuota() against a fake fetch
// ---------------------------------------------------------------------------------------

/** Replaces the global fetch for one test; records each request. */
function fakeFetch(t, respond) {
  const requests = [];
  const original = globalThis.fetch;
  globalThis.fetch = async (url, init = {}) => {
    requests.push({ url, ...init });
    return respond(url, init);
  };
  t.after(() => {
    globalThis.fetch = original;
  });
  return requests;
}

/** A response whose body arrives in the given chunks (strings or bytes). */
function chunked(chunks, init = {}) {
  const body = new ReadableStream({
    start(controller) {
      for (const c of chunks) controller.enqueue(typeof c === 'string' ? encoder.encode(c) : c);
      controller.close();
    },
  });
  return new Response(body, {
    status: 200,
    headers: { 'content-type': 'text/event-stream' },
    ...init,
  });
}

/** Runs ask() and records every callback. */
async function run(query, options = {}) {
  const calls = [];
  const outcome = await ask(query, {
    ...options,
    onToken: (token) => calls.push(['token', token]),
    onDone: (done) => calls.push(['done', done]),
    onError: (error) => calls.push(['error', error]),
  });
  return { outcome, calls };
}

test('ask streams tokens in order, then done, from chunks split mid-character', async (t) => {
  const bytes = encoder.encode(STREAM);
  const chunks = [];
  for (let at = 0; at < bytes.length; at += 7) chunks.push(bytes.subarray(at, at + 7));
  const requests = fakeFetch(t, () => chunked(chunks));
  const { outcome, calls } = await run('¿Qué tal?', { key: 'k-1', topK: 3, baseUrl: 'http://h:1' });

  assert.deepEqual(calls, [...TOKENS.map((tk) => ['token', tk]), ['done', DONE]]);
  assert.deepEqual(outcome, DONE);
  assert.equal(requests.length, 1);
  const [req] = requests;
  assert.equal(req.url, 'http://h:1/api/v1/ai/ask?stream=true');
  assert.equal(req.method, 'POST');
  assert.equal(req.headers.authorization, 'Bearer k-1');
  assert.equal(req.headers['content-type'], 'application/json');
  assert.deepEqual(JSON.parse(req.body), { query: '¿Qué tal?', topK: 3 });
});

test('without a key no authorization header is sent', async (t) => {
  const requests = fakeFetch(t, () => chunked([`data: ${JSON.stringify(DONE)}\n\n`]));
  await run('q', { key: '' });
  assert.equal(requests[0].headers.authorization, undefined);
  assert.deepEqual(JSON.parse(requests[0].body), { query: 'q' });
});

test('an error event mid-answer ends the ask with that error', async (t) => {
  fakeFetch(t, () =>
    chunked([
      'data: {"type":"token","token":"The"}\n\n',
      'data: {"type":"error","code":"UPSTREAM_ERROR","message":"cut"}\n\n',
    ]),
  );
  const { outcome, calls } = await run('q');
  const error = { type: 'error', code: 'UPSTREAM_ERROR', message: 'cut' };
  assert.deepEqual(calls, [['token', 'The'], ['error', error]]);
  assert.deepEqual(outcome, error);
});

test('a refusal before the answer (429 with one SSE error event) reports code, status and retry-after', async (t) => {
  const event = { type: 'error', code: 'QUOTA_EXCEEDED', message: 'the quota resets at 2030-01-01T00:00:00Z' };
  fakeFetch(t, () =>
    chunked([`data: ${JSON.stringify(event)}\n\n`], {
      status: 429,
      headers: { 'content-type': 'text/event-stream', 'retry-after': '3600' },
    }),
  );
  const { outcome, calls } = await run('q');
  assert.deepEqual(outcome, { ...event, status: 429, retryAfter: 3600 });
  assert.deepEqual(calls, [['error', outcome]]);
});

test('a JSON error body (e.g. 405 before streaming starts) is reported as that error', async (t) => {
  fakeFetch(
    t,
    () =>
      new Response('{"type":"error","code":"BAD_REQUEST","message":"bad stream value"}', {
        status: 400,
        headers: { 'content-type': 'application/json' },
      }),
  );
  const { outcome } = await run('q');
  assert.deepEqual(outcome, { type: 'error', code: 'BAD_REQUEST', message: 'bad stream value', status: 400 });
});

test("a proxy's HTML error page is BAD_RESPONSE with the status", async (t) => {
  fakeFetch(
    t,
    () => new Response('<html>502 Bad Gateway</html>', { status: 502, headers: { 'content-type': 'text/html' } }),
  );
  const { outcome, calls } = await run('q');
  assert.equal(outcome.code, 'BAD_RESPONSE');
  assert.equal(outcome.status, 502);
  assert.equal(calls.length, 1);
});

test('a stream that ends without done or error is INCOMPLETE', async (t) => {
  fakeFetch(t, () => chunked(['data: {"type":"token","token":"The"}\n\n', 'data: {"type":"tok']));
  const { outcome, calls } = await run('q');
  assert.equal(outcome.code, 'INCOMPLETE');
  assert.deepEqual(calls.map(([kind]) => kind), ['token', 'error']);
});

test('an event that is not JSON is BAD_RESPONSE', async (t) => {
  fakeFetch(t, () => chunked(['data: {not json}\n\n']));
  const { outcome } = await run('q');
  assert.equal(outcome.code, 'BAD_RESPONSE');
});

test('a server that cannot be reached is NETWORK_ERROR', async (t) => {
  fakeFetch(t, () => {
    throw new TypeError('fetch failed');
  });
  const { outcome, calls } = await run('q');
  assert.equal(outcome.code, 'NETWORK_ERROR');
  assert.deepEqual(calls, [['error', outcome]]);
});

test('leaving a stream early cancels its body, which closes the connection', async (t) => {
  let cancelled = false;
  fakeFetch(t, () => {
    const body = new ReadableStream({
      start(stream) {
        stream.enqueue(encoder.encode('data: {"type":"token","token":"The"}\n\ndata: <html>\n\n'));
      },
      cancel() {
        cancelled = true;
      },
    });
    return new Response(body, { headers: { 'content-type': 'text/event-stream' } });
  });
  const { outcome } = await run('q');
  assert.equal(outcome.code, 'BAD_RESPONSE');
  assert.equal(cancelled, true);
});

test('abort: the ask ends with ABORTED after the first token', async (t) => {
  const controller = new AbortController();
  fakeFetch(t, (_url, init) => {
    const body = new ReadableStream({
      start(stream) {
        stream.enqueue(encoder.encode('data: {"type":"token","token":"The"}\n\n'));
        init.signal.addEventListener('abort', () => stream.error(new DOMException('aborted', 'AbortError')));
      },
    });
    return new Response(body, { headers: { 'content-type': 'text/event-stream' } });
  });
  const calls = [];
  const outcome = await ask('q', {
    signal: controller.signal,
    onToken: (token) => {
      calls.push(['token', token]);
      controller.abort();
    },
    onDone: () => calls.push(['done']),
    onError: (error) => calls.push(['error', error.code]),
  });
  assert.equal(outcome.code, 'ABORTED');
  assert.deepEqual(calls, [['token', 'The'], ['error', 'ABORTED']]);
});

test('getQuota returns the status, or the error object', async (t) => {
  const requests = fakeFetch(t, (url, init) =>
    init.headers.authorization
      ? Response.json({ limit: 3, remaining: 2, resetsAt: '2030-01-01T00:00:00Z' })
      : Response.json({ type: 'error', code: 'UNAUTHORIZED', message: 'no key' }, { status: 401 }),
  );
  assert.deepEqual(await getQuota({ key: 'k' }), { limit: 3, remaining: 2, resetsAt: '2030-01-01T00:00:00Z' });
  assert.equal(requests[0].url, '/api/v1/quota');
  assert.deepEqual(await getQuota(), { type: 'error', code: 'UNAUTHORIZED', message: 'no key', status: 401 });
});
