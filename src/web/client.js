// askstream's browser client: ask a question and receive the answer token by token.
//
// askstream serves this file at /client.js. It is a plain ES module with no dependencies
// and no build step; copy it into your own frontend, or import it from a page the same
// askstream server serves.
//
//   import { ask, getQuota } from '/client.js';
//   const controller = new AbortController();
//   const outcome = await ask('How do quota refunds work?', {
//     key,                                   // sent as `Authorization: Bearer <key>`
//     signal: controller.signal,             // abort() disconnects; the server refunds
//     onToken: (text) => output.append(text),
//     onDone: (done) => show(done.sources, done.quotaRemaining),
//     onError: (error) => alert(`${error.code}: ${error.message}`),
//   });
//
// Every ask ends with exactly one call of onDone or onError, and the promise resolves
// with the same object; it rejects only if a callback throws. Errors are values: the
// server's error codes (see the README), plus four of this client's own:
//
//   ABORTED        the signal aborted the ask (the server refunds it)
//   NETWORK_ERROR  the server could not be reached, or the connection failed mid-answer
//   INCOMPLETE     the stream ended without a `done` or `error` event
//   BAD_RESPONSE   the answer was not an askstream event stream (a proxy's error page)
//
// An error that came with a non-2xx status also carries `status`, and `retryAfter`
// (seconds) when the server sent a `retry-after` header.

/**
 * An incremental parser for a `text/event-stream` body that carries JSON in `data:`.
 *
 * Push the body's chunks as they arrive; each call returns the events that chunk
 * completed. A chunk may end anywhere: inside an event, inside a line, between a CR and
 * its LF, or in the middle of a multi-byte character. One `TextDecoder` in streaming
 * mode decodes the whole body, so a character split across chunks comes out whole.
 * Lines may end in LF, CRLF or CR. Comments (`: keep-alive`) and events with blank data
 * are ignored; the `data` lines of one event are joined with `\n` and parsed as JSON.
 */
export class EventStreamParser {
  /** One decoder for the whole stream: it holds the first bytes of a split character. */
  #decoder = new TextDecoder('utf-8');
  /** Text after the last line break: a partial line waits here for the next chunk. */
  #line = '';
  /** The data lines of the event being read, or null before its first one. */
  #data = null;
  /** The last chunk ended with CR, so an LF at the start of the next one is its pair. */
  #afterCr = false;

  /**
   * Feeds one chunk (a `Uint8Array`, or already decoded text).
   * @returns {object[]} the events the chunk completed, in order
   * @throws {SyntaxError} if an event's data is not JSON
   */
  push(chunk) {
    const text = typeof chunk === 'string' ? chunk : this.#decoder.decode(chunk, { stream: true });
    return this.#read(text);
  }

  /**
   * Ends the stream. An event without its closing blank line is dropped, as
   * `EventSource` drops it: the server ends every event with one.
   * @returns {object[]} events completed by the decoder's last bytes (normally none)
   */
  end() {
    const events = this.#read(this.#decoder.decode());
    this.#line = '';
    this.#data = null;
    this.#afterCr = false;
    return events;
  }

  #read(text) {
    const events = [];
    if (this.#afterCr && text.startsWith('\n')) text = text.slice(1);
    if (text.length > 0) this.#afterCr = false;
    const buffer = this.#line + text;
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    for (let m = lineEnd.exec(buffer); m; m = lineEnd.exec(buffer)) {
      this.#field(buffer.slice(start, m.index), events);
      start = lineEnd.lastIndex;
      // A CR that ends the buffer may be the first half of a CRLF split across chunks.
      if (m[0] === '\r' && start === buffer.length) this.#afterCr = true;
    }
    this.#line = buffer.slice(start);
    return events;
  }

  #field(line, events) {
    if (line === '') {
      // A blank line ends the event.
      const data = this.#data;
      this.#data = null;
      if (data !== null && data.trim() !== '') events.push(JSON.parse(data));
      return;
    }
    if (line.startsWith(':')) return; // a comment: the server's heartbeat
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    if (name !== 'data') return; // `event`, `id` and `retry` mean nothing to askstream
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    this.#data = this.#data === null ? value : `${this.#data}\n${value}`;
  }
}

/**
 * Asks a question and streams the answer (`POST /api/v1/ai/ask?stream=true`).
 *
 * @param {string} query the question (1 to 4000 characters)
 * @param {object} [options]
 * @param {string} [options.key] API key, sent as a bearer token when not empty
 * @param {number} [options.topK] how many sources to retrieve (1 to 20)
 * @param {AbortSignal} [options.signal] aborting it disconnects, and the ask is refunded
 * @param {(token: string) => void} [options.onToken] each token, in order
 * @param {(done: object) => void} [options.onDone] the `done` event: `sources`,
 *   `quotaRemaining`, `usage`, `timing`, `queryId`
 * @param {(error: object) => void} [options.onError] `{type: 'error', code, message}`
 * @param {string} [options.baseUrl] the server's origin, e.g. `http://127.0.0.1:8080`;
 *   empty for the page's own origin
 * @returns {Promise<object>} the `done` event or the error, whichever ended the ask
 */
export async function ask(query, options = {}) {
  const { key, topK, signal, baseUrl = '' } = options;
  const onToken = options.onToken ?? (() => {});
  const onDone = options.onDone ?? (() => {});
  const onError = options.onError ?? (() => {});
  const fail = (error) => {
    onError(error);
    return error;
  };

  const body = topK === undefined ? { query } : { query, topK };
  let res;
  try {
    res = await fetch(`${baseUrl}/api/v1/ai/ask?stream=true`, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        accept: 'text/event-stream',
        ...authHeaders(key),
      },
      body: JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (e) {
    return fail(transportError(e, signal, 'cannot reach the server'));
  }
  if (!isEventStream(res)) return fail(await errorFromBody(res));

  // Errors before the answer starts arrive as one `error` event with a non-2xx status.
  const extra = statusFields(res);
  const parser = new EventStreamParser();
  const reader = res.body.getReader();
  let settled = false;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (e) {
        return fail(transportError(e, signal, 'the connection failed mid-answer'));
      }
      let events;
      try {
        events = chunk.done ? parser.end() : parser.push(chunk.value);
      } catch (e) {
        return fail(clientError('BAD_RESPONSE', `an event was not JSON: ${e.message}`));
      }
      for (const event of events) {
        if (event?.type === 'token') {
          onToken(event.token);
        } else if (event?.type === 'done') {
          settled = true;
          onDone(event);
          return event;
        } else if (event?.type === 'error') {
          settled = true;
          return fail({ ...event, ...extra });
        }
        // Other event types may be added to the protocol later; skip them.
      }
      if (chunk.done) {
        return fail(
          clientError('INCOMPLETE', 'the connection ended before the answer was complete'),
        );
      }
    }
  } finally {
    // After `done` or `error` the server ends the response: read its last bytes so the
    // connection can be reused. Leaving any other way cancels, which closes the
    // connection, and the server refunds an unfinished ask.
    if (settled) drain(reader);
    else reader.cancel().catch(() => {});
  }
}

/**
 * Reads the caller's quota (`GET /api/v1/quota`).
 *
 * @param {object} [options] `key`, `signal` and `baseUrl`, as for {@link ask}
 * @returns {Promise<object>} `{limit, remaining, resetsAt}`, or an error object
 *   (`{type: 'error', code, message, status}`) as {@link ask} reports them
 */
export async function getQuota(options = {}) {
  const { key, signal, baseUrl = '' } = options;
  let res;
  try {
    res = await fetch(`${baseUrl}/api/v1/quota`, {
      headers: authHeaders(key),
      signal,
      cache: 'no-store',
    });
  } catch (e) {
    return transportError(e, signal, 'cannot reach the server');
  }
  if (!res.ok) return errorFromBody(res);
  try {
    return await res.json();
  } catch (e) {
    return transportError(e, signal, 'the quota could not be read');
  }
}

async function drain(reader) {
  try {
    while (!(await reader.read()).done);
  } catch {
    // The answer is complete; how the connection ends no longer matters.
  }
}

function authHeaders(key) {
  return key ? { authorization: `Bearer ${key}` } : {};
}

function isEventStream(res) {
  const type = res.headers.get('content-type') ?? '';
  return type.split(';')[0].trim().toLowerCase() === 'text/event-stream' && res.body !== null;
}

/** `status` and `retryAfter` for an error that came with a non-2xx status. */
function statusFields(res) {
  if (res.ok) return {};
  const fields = { status: res.status };
  const retryAfter = Number.parseInt(res.headers.get('retry-after') ?? '', 10);
  if (Number.isFinite(retryAfter)) fields.retryAfter = retryAfter;
  return fields;
}

/** The error object of a response that is not an event stream: askstream's JSON, or not. */
async function errorFromBody(res) {
  let text = '';
  try {
    text = await res.text();
  } catch {
    // The body is unreadable; the status still says what happened.
  }
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    // Not JSON: a proxy's page, most likely.
  }
  if (parsed?.type === 'error' && typeof parsed.code === 'string') {
    return { type: 'error', code: parsed.code, message: String(parsed.message ?? ''), ...statusFields(res) };
  }
  const type = res.headers.get('content-type') || 'no content type';
  return {
    ...clientError('BAD_RESPONSE', `the server answered ${res.status} with ${type}, not askstream's answer`),
    status: res.status,
  };
}

function transportError(e, signal, what) {
  if (signal?.aborted || e?.name === 'AbortError') {
    return clientError('ABORTED', 'the ask was stopped');
  }
  return clientError('NETWORK_ERROR', `${what}: ${e?.message ?? e}`);
}

function clientError(code, message) {
  return { type: 'error', code, message };
}
