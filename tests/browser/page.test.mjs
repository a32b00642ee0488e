// The demo page in a real browser: Debian's headless Chromium, driven by playwright-core,
// against the real askstream binary.
//
//   (cd tests/browser && npm ci)          # playwright-core only; it downloads no browser
//   node --test tests/browser/page.test.mjs
//
// The test builds the binary with `cargo build` (a no-op when it is fresh) unless
// ASKSTREAM_BIN names one, and uses /usr/bin/chromium unless CHROMIUM names another. It
// saves a screenshot of a finished answer in target/browser-test/; with
// ASKSTREAM_UPDATE_SCREENSHOT=1 it writes the README's docs/screenshot.png instead.
//
// No timing thresholds: streaming is shown by watching the answer grow, and every wait is
// for something the page shows.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import { ROOT, launchBrowser, serverBinary, startServer } from './harness.mjs';
const SCREENSHOT = process.env.ASKSTREAM_UPDATE_SCREENSHOT
  ? join(ROOT, 'docs/screenshot.png')
  : join(ROOT, 'target/browser-test/screenshot.png');

/** The main server: built-in corpus, answers slow enough to watch and to stop. */
const MAIN_FLAGS = ['--sim-ttft-ms', '50', '--sim-token-ms', '20', '--sim-tokens', '80', '--quota-limit', '3'];
const QUOTA_QUESTION = 'How do quota refunds work?';
const I18N_QUESTION = 'Internationalisation: 日本語, Ωmega, naïve café';

/** A document written to attack the page: markup in its text, title and url. */
const HOSTILE_DOC = `---
title: "Hostile <img src=x onerror=alert(1)> title"
url: javascript:alert(1)
---
The hostile token <script>alert(1)</script> and the token <b>bold</b> must show as text.
`;
const LINKED_DOC = `---
title: Linked guide
url: https://example.com/guide
---
A hostile token is only text, says the linked guide.
`;
const HOSTILE_QUESTION = 'hostile token script bold';
const HOSTILE_KEY = 'key-hostile';

let browser;
let main;
let hostile;
let docsDir;

before(async () => {
  const binary = serverBinary();
  docsDir = await mkdtemp(join(tmpdir(), 'askstream-docs-'));
  await writeFile(join(docsDir, 'hostile.md'), HOSTILE_DOC);
  await writeFile(join(docsDir, 'linked.md'), LINKED_DOC);
  await writeFile(join(docsDir, 'keys'), `${HOSTILE_KEY} tester 5\n`);
  [main, hostile] = await Promise.all([
    startServer(binary, MAIN_FLAGS),
    startServer(binary, [
      '--docs', docsDir, '--keys', join(docsDir, 'keys'),
      '--sim-ttft-ms', '0', '--sim-token-ms', '5', '--sim-tokens', '30',
    ]),
  ]);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await Promise.all([main?.stop(), hostile?.stop()]);
  if (docsDir) await rm(docsDir, { recursive: true, force: true });
});

scenario('an answer prints token by token, then its sources and the new quota', async () => {
  const { page, problems } = await openPage(main, 'alice');
  await waitForQuota(page, '3', '3');
  const oracle = askJson(main, QUOTA_QUESTION);

  await page.fill('#query', QUOTA_QUESTION);
  await page.click('#ask');
  // Sample the answer while the page says it is streaming: it must be seen growing.
  const lengths = [];
  for (;;) {
    const { length, state } = await page.evaluate(() => ({
      length: document.getElementById('answer').textContent.length,
      state: document.body.dataset.state,
    }));
    if (state !== 'streaming') break;
    lengths.push(length);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  await waitForState(page, 'done');

  const expected = await oracle;
  const answer = await text(page, '#answer');
  assert.equal(answer, expected.answer);
  const intermediate = new Set(lengths.filter((n) => n > 0 && n < answer.length));
  assert.ok(
    intermediate.size >= 3,
    `the answer should grow through at least 3 lengths, saw ${[...intermediate]} of ${answer.length}`,
  );
  assert.deepEqual(lengths, [...lengths].sort((a, b) => a - b), 'the answer only grows');

  const titles = await page.$$eval('#sources li > :first-child', (els) => els.map((e) => e.textContent));
  assert.deepEqual(titles, expected.sources.map((s) => s.title));
  const ids = await page.$$eval('#sources li code', (els) => els.map((e) => e.textContent));
  assert.deepEqual(ids, expected.sources.map((s) => s.id));
  await waitForQuota(page, '2', '3');
  assert.equal((await quotaOf(main, 'alice')).remaining, 2);
  assert.match(await text(page, '#status'), /done · 80 tokens/);

  await mkdir(dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  assert.deepEqual(problems, []);
});

scenario('a multi-byte answer renders intact', async () => {
  const { page, problems } = await openPage(main, 'erin');
  await waitForQuota(page, '3', '3');
  const oracle = askJson(main, I18N_QUESTION);

  await page.fill('#query', I18N_QUESTION);
  await page.click('#ask');
  await waitForState(page, 'done');
  const expected = await oracle;
  for (const sample of ['naïve café', '日本語', 'Ωmega ✓', 'Größenbeschränkungen', '« Où']) {
    assert.ok(expected.answer.includes(sample), `the corpus answer contains ${sample}`);
  }
  assert.equal(await text(page, '#answer'), expected.answer);
  assert.ok(!(await text(page, '#answer')).includes('\uFFFD'), 'no replacement character');
  assert.deepEqual(problems, []);
});

scenario('an exhausted quota shows QUOTA_EXCEEDED and when it resets', async () => {
  // Use up carol's 3 asks from outside the page.
  await Promise.all([1, 2, 3].map(() => askJson(main, QUOTA_QUESTION, 'carol')));
  const { page, problems } = await openPage(main, 'carol');
  await waitForQuota(page, '0', '3');

  await page.fill('#query', QUOTA_QUESTION);
  await page.click('#ask');
  await waitForState(page, 'error');
  assert.equal(await text(page, '#error code'), 'QUOTA_EXCEEDED');
  assert.match(await text(page, '#error'), /Quota exhausted — resets at .+/);
  assert.match(await text(page, '#error .detail'), /the quota resets at \d{4}-\d\d-\d\dT/);
  assert.equal(await text(page, '#answer'), '');
  assert.equal(await text(page, '#quota-remaining'), '0');
  assert.deepEqual(problems, []);
});

scenario('Stop aborts the answer and the page shows the refunded quota', async () => {
  const { page, problems } = await openPage(main, 'dave');
  await waitForQuota(page, '3', '3');
  const oracle = askJson(main, QUOTA_QUESTION);

  await page.fill('#query', QUOTA_QUESTION);
  await page.click('#ask');
  await page.waitForFunction(() => document.getElementById('answer').textContent.length > 0);
  await page.click('#stop');
  await waitForState(page, 'stopped');

  const full = await oracle;
  const partial = await text(page, '#answer');
  assert.ok(partial.length > 0 && partial.length < full.answer.length, 'stopped mid-answer');
  assert.ok(full.answer.startsWith(partial));
  assert.equal(await text(page, '#quota-remaining'), '3', 'the page shows the refund');
  assert.equal((await quotaOf(main, 'dave')).remaining, 3, 'the server refunded');
  assert.match(await text(page, '#status'), /stopped/);
  assert.equal(await page.$$eval('#sources li', (els) => els.length), 0);
  assert.deepEqual(problems, []);
});

scenario('markup in tokens, titles and urls renders as text, with keys', async () => {
  const { page, problems } = await openPage(hostile);
  // Without a key this server refuses, and the page says why.
  await page.waitForSelector('#error:not([hidden])');
  assert.equal(await text(page, '#error code'), 'UNAUTHORIZED');
  await setKey(page, HOSTILE_KEY);
  await waitForQuota(page, '5', '5');
  assert.equal(await page.isHidden('#error'), true);

  await page.fill('#query', HOSTILE_QUESTION);
  await page.click('#ask');
  await waitForState(page, 'done');

  const answer = await text(page, '#answer');
  assert.ok(answer.includes('<script>alert(1)</script>'), answer);
  assert.ok(answer.includes('<b>bold</b>'), answer);
  const titles = await page.$$eval('#sources li > :first-child', (els) =>
    els.map((e) => ({ tag: e.tagName, text: e.textContent, href: e.getAttribute('href'), rel: e.rel })),
  );
  assert.deepEqual(
    titles.find((t) => t.text.includes('Hostile')),
    { tag: 'SPAN', text: 'Hostile <img src=x onerror=alert(1)> title', href: null, rel: undefined },
    'a javascript: url is not a link',
  );
  assert.deepEqual(
    titles.find((t) => t.text === 'Linked guide'),
    { tag: 'A', text: 'Linked guide', href: 'https://example.com/guide', rel: 'noopener noreferrer' },
  );
  const injected = await page.evaluate(() => ({
    inAnswer: document.querySelectorAll('#answer *').length,
    scripts: document.querySelectorAll('script').length,
    markup: document.querySelectorAll('img, b, #sources script').length,
    javascriptLinks: document.querySelectorAll('a[href^="javascript:" i]').length,
  }));
  assert.deepEqual(injected, { inAnswer: 0, scripts: 1, markup: 0, javascriptLinks: 0 });
  assert.deepEqual(problems, [], 'no dialog, no CSP violation, no page error');
});

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/** A test that, when it fails, also tells the state of the servers and the browser. */
function scenario(name, body) {
  test(name, { timeout: 30_000 }, async () => {
    try {
      await body();
    } catch (error) {
      const state = [
        `browser connected: ${browser?.isConnected()}`,
        ...[main, hostile].map((s) => s && `server ${s.url}: ${s.exitCode() ?? 'running'}, log:\n${s.log().slice(-1500)}`),
      ];
      error.message += `\n${state.join('\n')}`;
      throw error;
    }
  });
}

/**
 * A fresh browser context on the page, with `key` in the key field. `problems` collects
 * what must never happen: a dialog (an injected `alert`), a CSP violation, a page error.
 */
async function openPage(server, key) {
  const context = await browser.newContext({ viewport: { width: 960, height: 720 } });
  const page = await context.newPage();
  const problems = [];
  page.on('dialog', (dialog) => {
    problems.push(`dialog: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (/Content Security Policy|Refused to/i.test(message.text())) problems.push(message.text());
  });
  await page.goto(`${server.url}/`);
  if (key !== undefined) await setKey(page, key);
  return { page, problems };
}

async function setKey(page, key) {
  await page.fill('#key', key);
  await page.dispatchEvent('#key', 'change');
}

function waitForState(page, state) {
  return page.waitForFunction((s) => document.body.dataset.state === s, state);
}

function waitForQuota(page, remaining, limit) {
  return page.waitForFunction(
    ([r, l]) =>
      document.getElementById('quota-remaining').textContent === r &&
      document.getElementById('quota-limit').textContent === l,
    [remaining, limit],
  );
}

async function text(page, selector) {
  return page.$eval(selector, (el) => el.textContent);
}

/** The same question in JSON mode, as another user: what the page must show. */
async function askJson(server, query, key = 'oracle') {
  const res = await fetch(`${server.url}/api/v1/ai/ask`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify({ query }),
  });
  assert.equal(res.status, 200, `JSON ask for ${key}`);
  return res.json();
}

async function quotaOf(server, key) {
  const res = await fetch(`${server.url}/api/v1/quota`, { headers: { authorization: `Bearer ${key}` } });
  assert.equal(res.status, 200);
  return res.json();
}
