// The demo page's script: wires the form to /client.js and renders what arrives.
//
// Everything the server sends is rendered as text (`textContent`, text nodes), never as
// HTML: a token or a source title that contains `<script>` shows up as those characters.
// The page's state is mirrored in `<body data-state>` (idle, streaming, done, stopped,
// error) for the style sheet and for tests.

import { ask, getQuota } from './client.js';

const $ = (id) => document.getElementById(id);
const form = $('ask-form');
const queryInput = $('query');
const keyInput = $('key');
const askButton = $('ask');
const stopButton = $('stop');
const answerEl = $('answer');
const sourcesEl = $('sources');
const statusEl = $('status');
const errorEl = $('error');
const quotaRemainingEl = $('quota-remaining');
const quotaLimitEl = $('quota-limit');
const quotaResetsEl = $('quota-resets');

/** What the page last learnt about the quota: `{limit, remaining, resetsAt}`. */
let quota = null;
/** Aborts the ask in flight; null when none is. */
let controller = null;
/** Counts quota reads, so a slow, outdated answer is ignored. */
let quotaReads = 0;

form.addEventListener('submit', (event) => {
  event.preventDefault();
  start();
});
stopButton.addEventListener('click', () => controller?.abort());
keyInput.addEventListener('change', () => {
  hideError();
  refreshQuota(true);
});
refreshQuota(true);

async function start() {
  const query = queryInput.value.trim();
  if (query === '' || controller !== null) return;
  controller = new AbortController();
  const remainingBefore = quota?.remaining;
  hideError();
  sourcesEl.replaceChildren();
  // One text node that grows: each token is appended as text, never parsed as HTML.
  const text = document.createTextNode('');
  answerEl.replaceChildren(text);
  setState('streaming');
  setStatus('waiting for the first token…');
  let tokens = 0;

  const outcome = await ask(query, {
    key: keyInput.value.trim(),
    signal: controller.signal,
    onToken(token) {
      text.appendData(token);
      tokens += 1;
      if (tokens === 1) setStatus('streaming…');
    },
    onDone(done) {
      renderSources(done.sources ?? []);
      if (quota !== null) quota.remaining = done.quotaRemaining;
      renderQuota();
      setStatus(
        `done · ${tokens} tokens · first token after ${ms(done.timing?.ttftMs)}, ` +
          `all after ${ms(done.timing?.totalMs)}`,
      );
    },
  });
  controller = null;

  if (outcome.type === 'done') {
    if (quota === null) await refreshQuota(false);
    setState('done');
  } else if (outcome.code === 'ABORTED') {
    setStatus('stopped — the ask is refunded');
    await refreshUntilRefunded(remainingBefore);
    setState('stopped');
  } else {
    setStatus(tokens > 0 ? 'failed mid-answer — the ask is refunded' : 'not answered');
    await refreshQuota(false);
    showError(outcome);
    setState('error');
  }
}

function setState(state) {
  document.body.dataset.state = state;
  const streaming = state === 'streaming';
  askButton.disabled = streaming;
  stopButton.disabled = !streaming;
  answerEl.setAttribute('aria-busy', String(streaming));
}

function setStatus(text) {
  statusEl.textContent = text ? `· ${text}` : '';
}

/** Reads the quota; shows a failure as the page's error when `report` is set. */
async function refreshQuota(report) {
  // Only the latest read counts: one started before the key changed must not land last.
  const seq = ++quotaReads;
  const result = await getQuota({ key: keyInput.value.trim() });
  if (seq !== quotaReads) return;
  if (result.type === 'error') {
    quota = null;
    renderQuota();
    if (report) showError(result);
    return;
  }
  quota = result;
  renderQuota();
}

/**
 * After a stop the server notices the closed connection and refunds within a moment;
 * read the quota until the refund shows (or a few tries have passed).
 */
async function refreshUntilRefunded(remainingBefore) {
  for (const delay of [50, 150, 300, 600, 1200]) {
    await new Promise((resolve) => setTimeout(resolve, delay));
    await refreshQuota(false);
    if (remainingBefore === undefined || (quota !== null && quota.remaining >= remainingBefore)) {
      return;
    }
  }
}

function renderQuota() {
  quotaRemainingEl.textContent = quota === null ? '–' : String(quota.remaining);
  quotaLimitEl.textContent = quota === null ? '–' : String(quota.limit);
  quotaResetsEl.textContent = quota?.resetsAt ? ` · resets ${when(quota.resetsAt)}` : '';
}

function renderSources(sources) {
  sourcesEl.replaceChildren(...sources.map(sourceItem));
}

function sourceItem(source) {
  const item = document.createElement('li');
  const href = webUrl(source.url);
  const title = document.createElement(href === null ? 'span' : 'a');
  title.textContent = source.title ?? source.id;
  if (href !== null) {
    title.href = href;
    title.rel = 'noopener noreferrer';
    title.target = '_blank';
  }
  const meta = document.createElement('span');
  meta.className = 'meta';
  const id = document.createElement('code');
  id.textContent = source.id;
  meta.append(id, ` · score ${Number(source.score).toFixed(2)}`);
  item.append(title, meta);
  return item;
}

/** An absolute http(s) URL, or null: `javascript:` and other schemes never become links. */
function webUrl(url) {
  if (typeof url !== 'string') return null;
  try {
    const parsed = new URL(url);
    return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? parsed.href : null;
  } catch {
    return null;
  }
}

/** What each error means to the person at the page; the server's message follows. */
const EXPLAIN = {
  QUOTA_EXCEEDED: (e) => `Quota exhausted — resets at ${resetTime(e)}`,
  UNAUTHORIZED: () => 'This server needs a valid API key — enter it above',
  BAD_REQUEST: () => 'The question was not accepted',
  OVERLOADED: () => 'The server is busy — try again in a moment',
  SHUTTING_DOWN: () => 'The server is restarting — try again shortly',
  UPSTREAM_ERROR: () => 'The model failed',
  UPSTREAM_TIMEOUT: () => 'The model took too long',
  SLOW_CLIENT: () => 'This page did not keep up with the stream',
  INTERNAL: () => 'The server hit a bug',
  NETWORK_ERROR: () => 'The connection failed',
  INCOMPLETE: () => 'The answer was cut off',
  BAD_RESPONSE: () => 'The server sent something unexpected',
};

function showError(error) {
  const code = document.createElement('code');
  code.textContent = error.code;
  const explain = EXPLAIN[error.code]?.(error) ?? 'Something went wrong';
  const detail = document.createElement('span');
  detail.className = 'detail';
  detail.textContent = error.message;
  errorEl.replaceChildren(code, explain, detail);
  errorEl.hidden = false;
}

function hideError() {
  errorEl.hidden = true;
  errorEl.replaceChildren();
}

function resetTime(error) {
  if (quota?.resetsAt) return when(quota.resetsAt);
  if (error.retryAfter !== undefined) return when(Date.now() + error.retryAfter * 1000);
  return 'the end of the window';
}

function when(time) {
  return new Date(time).toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
}

function ms(value) {
  if (typeof value !== 'number') return '?';
  return value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(1)} s`;
}
