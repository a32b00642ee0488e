// A page on another origin calling the API from a real browser (contract §1.4): with
// `--cors-origin` naming the page's origin, the browser lets it stream an answer and read
// `x-query-id`, and read a 429's `retry-after`; without the flag the same page is blocked.
//
//   (cd tests/browser && npm ci)
//   node --test tests/browser/cors.test.mjs
//
// The page's origin is a small Node server on another port: same host, another origin.
// The request carries `Authorization` and a JSON content type, so the browser sends a
// preflight first, as it would for any real frontend.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';

import { launchBrowser, serverBinary, startServer } from './harness.mjs';

/** The frontend: asks `api` (from the query string) once or twice, and records what it saw. */
const PAGE = `<!doctype html><meta charset="utf-8"><title>frontend</title>
<script type="module">
const api = new URLSearchParams(location.search).get('api');
async function ask(user) {
  try {
    const res = await fetch(api + '/api/v1/ai/ask?stream=true', {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer ' + user },
      body: JSON.stringify({ query: 'How do quota refunds work?' }),
    });
    const text = await res.text();
    return {
      status: res.status,
      queryId: res.headers.get('x-query-id'),
      retryAfter: res.headers.get('retry-after'),
      done: text.includes('"type":"done"'),
      tokens: (text.match(/"type":"token"/g) || []).length,
    };
  } catch (e) {
    return { blocked: e.name };
  }
}
window.result = (async () => {
  const user = 'cors-' + Math.random().toString(36).slice(2);
  return { first: await ask(user), second: await ask(user) };
})();
</script>`;

let browser;
let frontend;
let origin;
let allowed;
let plain;

before(async () => {
  frontend = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(PAGE);
  });
  await new Promise((resolve) => frontend.listen(0, '127.0.0.1', resolve));
  origin = `http://127.0.0.1:${frontend.address().port}`;
  const binary = serverBinary();
  const sim = ['--sim-ttft-ms', '0', '--sim-token-ms', '2', '--sim-tokens', '12', '--quota-limit', '1'];
  [allowed, plain] = await Promise.all([
    startServer(binary, [...sim, '--cors-origin', origin]),
    startServer(binary, sim),
  ]);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await Promise.all([allowed?.stop(), plain?.stop()]);
  await new Promise((resolve) => frontend?.close(resolve) ?? resolve());
});

/** Opens the frontend against `api` and returns what its two asks saw. */
async function frontendAsks(api) {
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    await page.goto(`${origin}/?api=${encodeURIComponent(api.url)}`);
    return await page.evaluate(() => window.result);
  } finally {
    await context.close();
  }
}

test('a named origin streams an answer and reads the 429 that follows', { timeout: 30_000 }, async () => {
  const { first, second } = await frontendAsks(allowed);
  assert.equal(first.status, 200, JSON.stringify(first));
  assert.ok(first.done, 'the stream reached its done event');
  assert.equal(first.tokens, 12);
  assert.match(first.queryId ?? '', /^[0-9a-f]{32}$/, 'x-query-id is exposed');
  // The quota was one ask: the page can read the refusal and when to retry.
  assert.equal(second.status, 429, JSON.stringify(second));
  assert.ok(Number(second.retryAfter) > 0, 'retry-after is exposed');
});

test('without --cors-origin the browser blocks the same page', { timeout: 30_000 }, async () => {
  const { first, second } = await frontendAsks(plain);
  assert.deepEqual(first, { blocked: 'TypeError' });
  assert.deepEqual(second, { blocked: 'TypeError' });
});
