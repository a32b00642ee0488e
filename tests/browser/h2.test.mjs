// Twelve answers from one tab (contract §1.4): over https the browser speaks HTTP/2 (ALPN)
// and streams all twelve at once on one connection; the same page over cleartext HTTP/1.1
// streams six at a time, the browser's limit of connections per origin.
//
//   (cd tests/browser && npm ci)
//   node --test tests/browser/h2.test.mjs
//
// The certificate is made here with openssl and trusted by its key alone
// (`--ignore-certificate-errors-spki-list`), so every other certificate check stays on.
// Concurrency is read from the order of events, not from timings: an answer is open from
// its first token to its `done`, and the figure is the most answers open at one moment.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { launchBrowser, serverBinary, startServer } from './harness.mjs';

const ANSWERS = 12;
/** Answers of about two seconds: long enough that twelve started together overlap. */
const SIM = ['--sim-ttft-ms', '0', '--sim-token-ms', '100', '--sim-tokens', '20'];

let dir;
let browser;
let tls;
let plain;

/** A self-signed P-256 certificate for 127.0.0.1, and the base64 SHA-256 of its key. */
function makeCertificate(folder) {
  const cert = join(folder, 'cert.pem');
  const key = join(folder, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ], { stdio: 'ignore' });
  const publicKey = execFileSync('openssl', ['x509', '-in', cert, '-noout', '-pubkey']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: publicKey });
  const spki = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der });
  return { cert, key, spki: spki.toString('base64') };
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'askstream-h2-'));
  const { cert, key, spki } = makeCertificate(dir);
  const binary = serverBinary();
  [tls, plain] = await Promise.all([
    startServer(binary, [...SIM, '--tls-cert', cert, '--tls-key', key]),
    startServer(binary, SIM),
  ]);
  browser = await launchBrowser([`--ignore-certificate-errors-spki-list=${spki}`]);
});

after(async () => {
  await browser?.close();
  await Promise.all([tls?.stop(), plain?.stop()]);
  if (dir) await rm(dir, { recursive: true, force: true });
});

/**
 * Opens the demo page at `server` and asks `ANSWERS` questions at once through its own
 * `/client.js`; for each answer, when its first token and its end arrived, how it ended,
 * and the protocol the page and the asks used.
 */
async function askAtOnce(server) {
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    await page.goto(`${server.url}/`);
    return await page.evaluate(async (n) => {
      const { ask } = await import('/client.js');
      const run = Math.random().toString(36).slice(2);
      const answers = await Promise.all(Array.from({ length: n }, async (_, i) => {
        let first = null;
        const outcome = await ask('How do quota refunds work?', {
          key: `h2-${run}-${i}`,
          onToken: () => { first ??= performance.now(); },
        });
        return { first, end: performance.now(), type: outcome.type, code: outcome.code };
      }));
      const asks = performance.getEntriesByType('resource')
        .filter((e) => e.name.includes('/api/v1/ai/ask'));
      return {
        page: performance.getEntriesByType('navigation')[0].nextHopProtocol,
        protocols: [...new Set(asks.map((e) => e.nextHopProtocol))],
        answers,
      };
    }, ANSWERS);
  } finally {
    await context.close();
  }
}

/** The most answers open at one moment (an answer is open from its first token to its end). */
function concurrency(answers) {
  return Math.max(...answers.map(({ first: t }) =>
    answers.filter((a) => a.first <= t && a.end > t).length));
}

test('over https the tab streams all twelve answers at once on HTTP/2', async () => {
  const seen = await askAtOnce(tls);
  assert.equal(seen.page, 'h2', 'the page came over HTTP/2');
  assert.deepEqual(seen.protocols, ['h2'], 'every ask went over HTTP/2');
  for (const a of seen.answers) assert.equal(a.type, 'done', JSON.stringify(a));
  const open = concurrency(seen.answers);
  console.log(`https (h2): ${open} of ${ANSWERS} answers streaming at once`);
  assert.equal(open, ANSWERS);
});

test('over cleartext HTTP/1.1 the same tab streams six at a time', async () => {
  const seen = await askAtOnce(plain);
  assert.equal(seen.page, 'http/1.1');
  assert.deepEqual(seen.protocols, ['http/1.1']);
  for (const a of seen.answers) assert.equal(a.type, 'done', JSON.stringify(a));
  const open = concurrency(seen.answers);
  console.log(`http (HTTP/1.1): ${open} of ${ANSWERS} answers streaming at once`);
  assert.equal(open, 6, "Chromium's six connections per origin");
});
