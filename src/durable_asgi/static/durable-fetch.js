/**
 * durable-fetch.js — the browser client for durable_asgi (an ES module, no build step).
 *
 * `DurableFetchClient.fetch` has `fetch`'s signature and returns a real `Response` whose body
 * is the *whole* stream, every byte exactly once: when the connection drops or the body ends
 * abnormally while the stream still runs on the server, it reconnects with
 * `Durable-Offset: <bytes delivered>` and keeps filling the same body. Keys are added for you
 * and kept in `localStorage` per request, so the same request after a reload joins the stream
 * that is already running instead of starting the handler again.
 *
 *     import { DurableFetchClient } from "/_durable/durable-fetch.js";
 *     const client = new DurableFetchClient();
 *     const response = await client.fetch("/api/chat", { method: "POST", body });
 *     for await (const text of response.body.pipeThrough(new TextDecoderStream())) show(text);
 *
 * The wire protocol it speaks (request headers Durable-Key, Durable-Offset, Durable-Control;
 * response headers Durable-Offset, Durable-State, Durable-Replay) is durable_asgi's; see
 * docs/clients.md.
 *
 * Deliberate choices, so nobody "fixes" them back:
 * - A clean end of the body is the only proof that a stream is complete; an abnormal end is
 *   never passed on as one. A stream that can't be finished (failed, aborted, deleted) errors
 *   the body with a `DurableStreamError`.
 * - A response without a Durable-State header isn't durable (no middleware, or no key for this
 *   request): it is returned untouched and never retried, since a retry would run the handler
 *   again.
 * - Reconnecting at offset 0 first asks for the stream's status: a request at offset 0 for a
 *   failed stream would start the handler again, which a reconnect must never do.
 */

const OFFSET = "Durable-Offset";
const STATE = "Durable-State";
const REPLAY = "Durable-Replay";
const CONTROL = "Durable-Control";
/** A request header only this client reads (it is never sent): "resume, don't start". */
const RESUME = "Durable-Resume";

/** States after which a body can't go on: its end is final. */
const FINAL_ERRORS = new Set(["failed", "aborted", "absent"]);

/**
 * The error a durable body (or a control call) fails with when the stream can't be read to
 * its end.
 *
 * `state` says why: `"failed"` (the handler raised), `"aborted"` (someone called abort; the
 * error's `name` is then `"AbortError"`, so UIs that ignore user-stopped requests — like the AI
 * SDK's — treat it as a stop), `"absent"` (deleted or expired), `"unreachable"` (the server
 * couldn't be reached within `maxRetries`; see `cause`), or `"protocol"` (the server answered
 * something a durable_asgi server doesn't).
 */
export class DurableStreamError extends Error {
  /**
   * @param {string} message
   * @param {{state: string, key?: string|null, offset?: number, status?: number, cause?: unknown}} details
   */
  constructor(message, { state, key = null, offset = 0, status = 0, cause } = { state: "failed" }) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = state === "aborted" ? "AbortError" : "DurableStreamError";
    /** @type {string} */ this.state = state;
    /** @type {string|null} */ this.key = key;
    /** @type {number} bytes delivered before the error */ this.offset = offset;
    /** @type {number} HTTP status of the answer that ended it, or 0 */ this.status = status;
  }
}

/** A `Storage`-like map that lives as long as the page: the default where there is no
 * `localStorage` (workers, Node, sandboxed frames). */
export class MemoryStorage {
  #items = new Map();
  get length() {
    return this.#items.size;
  }
  /** @param {number} index */
  key(index) {
    return [...this.#items.keys()][index] ?? null;
  }
  /** @param {string} name */
  getItem(name) {
    return this.#items.has(name) ? this.#items.get(name) : null;
  }
  /** @param {string} name @param {string} value */
  setItem(name, value) {
    this.#items.set(name, String(value));
  }
  /** @param {string} name */
  removeItem(name) {
    this.#items.delete(name);
  }
  clear() {
    this.#items.clear();
  }
}

function defaultStorage() {
  try {
    const storage = globalThis.localStorage;
    if (storage) {
      const probe = "durable-fetch:probe";
      storage.setItem(probe, "1");
      storage.removeItem(probe);
      return storage;
    }
  } catch {
    // Blocked (sandboxed frame, privacy mode): fall back to memory.
  }
  return new MemoryStorage();
}

/**
 * A fetch that survives dropped connections and reloads, for durable_asgi servers.
 *
 * Options (all optional):
 * - `keyHeader` ("Durable-Key"): the request header carrying the key. `null` when the server
 *   takes keys from the URL or body: then no key header is sent.
 * - `storage` (localStorage, else memory): where per-request keys are kept so a reload finds
 *   them. Anything with getItem/setItem/removeItem: `sessionStorage`, `new MemoryStorage()`.
 * - `storagePrefix` ("durable-fetch:"), `ttl` (21600 s: how long a kept key is trusted; match
 *   the server's `ttl`).
 * - `maxRetries` (10): reconnect attempts in a row without receiving a byte before giving up.
 * - `backoff` ({initial: 100, max: 5000}, ms): delay before attempt n is
 *   min(max, initial * 2^(n-1)), ±20 % jitter.
 * - `fetch` (globalThis.fetch): the fetch used underneath.
 * - `abortOnSignal` (false): when a request's `signal` aborts, also stop the handler on the
 *   server (`abort`). By default the signal only stops this page reading; the stream goes on
 *   and can be resumed.
 * - `onReconnect`: called as `({key, url, offset, attempt, error})` before each reconnect.
 *
 * Example:
 *
 *     const client = new DurableFetchClient({ maxRetries: 20 });
 *     const response = await client.fetch("/api/chat", { method: "POST", body: "hi" });
 *     const text = await response.text();     // all of it, even across network drops
 */
export class DurableFetchClient {
  /** @param {import("./durable-fetch").DurableFetchOptions} [options] */
  constructor(options = {}) {
    const backoff = options.backoff ?? {};
    this.keyHeader = options.keyHeader === undefined ? "Durable-Key" : options.keyHeader;
    this.storage = options.storage ?? defaultStorage();
    this.storagePrefix = options.storagePrefix ?? "durable-fetch:";
    this.ttl = options.ttl ?? 6 * 3600;
    this.maxRetries = options.maxRetries ?? 10;
    this.backoff = { initial: backoff.initial ?? 100, max: backoff.max ?? 5000 };
    this.abortOnSignal = options.abortOnSignal ?? false;
    this.onReconnect = options.onReconnect ?? null;
    const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
    /** @type {typeof fetch} */
    this._fetch = (url, init) => fetchImpl(url, init);
    // Bound, so `client.fetch` can be handed around (e.g. to the AI SDK's DefaultChatTransport).
    this.fetch = this.fetch.bind(this);
    this.resume = this.resume.bind(this);
    this.status = this.status.bind(this);
    this.abort = this.abort.bind(this);
    this.delete = this.delete.bind(this);
    this.#purgeExpired();
  }

  /**
   * Like `fetch`, but the response body is the whole stream, exactly once, across network
   * errors and abnormal ends (it reconnects from the byte it has).
   *
   * Extra `init` fields: `durableKey` (the key; default: the key header if the request has
   * one, else one generated and kept per request), `requestId` (names the request for the kept
   * key, instead of a hash of method + URL + body), `durableResume` (true: only continue a
   * stream still running, as `resume` with `running: true` does, answering 204 when there is
   * none, which is what the AI SDK's `reconnectToStream` expects — also asked for with a
   * `Durable-Resume: true` header, which is not sent).
   *
   * The response has `durableKey`, `resumed` (served from the store: the handler was already
   * running or done), `durable` (the server answered with durable headers) and `reconnects`.
   *
   * @param {RequestInfo | URL} input
   * @param {import("./durable-fetch").DurableRequestInit} [init]
   * @returns {Promise<import("./durable-fetch").DurableResponse>}
   */
  async fetch(input, init = {}) {
    const call = await this.#prepare(input, init);
    if (call.resumeOnly) {
      // The AI SDK's reconnect contract: the running answer, or 204 when nothing runs.
      const response = await this.#resume(call, { ...init, running: true });
      return response ?? markResponse(new Response(null, { status: 204 }), null, false, false);
    }
    const key = this.#keyFor(call, init, true);
    return this.#open(call, key, { offset: 0, resumed: false, probe: false });
  }

  /**
   * Continue the stream this request started, if the server still has it: for after a reload.
   * Returns a response whose body is the stream from `init.offset` (default 0), or `null` when
   * there is nothing to continue (never started, deleted, expired, or failed; with
   * `init.running`, also when it has finished). The handler is never started by a resume.
   *
   * The key is `init.durableKey`, the key header, or the one kept for this request (by
   * `requestId`, else by method + URL + body, else the latest one kept for this URL). Pass the
   * original `method` and `body` when the server reads the key from the body.
   *
   * @param {RequestInfo | URL} input
   * @param {import("./durable-fetch").DurableResumeInit} [init]
   * @returns {Promise<import("./durable-fetch").DurableResponse | null>}
   */
  async resume(input, init = {}) {
    return this.#resume(await this.#prepare(input, init), init);
  }

  /**
   * The stream's status, as the server's `Durable-Control: status` answers it: `{key, state,
   * in_progress, offset, chunks, readers, status_code, created_at, updated_at, expires_at}`,
   * or `{state: "absent"}` when there is no such stream (or no key is known for this request).
   *
   * @param {RequestInfo | URL} input
   * @param {import("./durable-fetch").DurableControlInit} [init]
   * @returns {Promise<import("./durable-fetch").DurableStatus>}
   */
  async status(input, init = {}) {
    const call = await this.#prepare(input, init);
    const key = this.#keyFor(call, init, false);
    if (key === null && this.keyHeader !== null) return { state: "absent" };
    return this.#status(call, key);
  }

  /**
   * Stop the stream's handler on the server. Bytes so far stay readable; readers (this
   * page's too) end with a `DurableStreamError` whose state is "aborted". Idempotent.
   *
   * @param {RequestInfo | URL} input
   * @param {import("./durable-fetch").DurableControlInit} [init]
   * @returns {Promise<void>}
   */
  async abort(input, init = {}) {
    const call = await this.#prepare(input, init);
    const key = this.#keyFor(call, init, false);
    if (key === null && this.keyHeader !== null) return;
    await this.#control(call, key, "abort");
  }

  /**
   * Stop the stream if it runs and remove it from the server, and forget its key here, so the
   * same request runs the handler anew. Idempotent.
   *
   * @param {RequestInfo | URL} input
   * @param {import("./durable-fetch").DurableControlInit} [init]
   * @returns {Promise<void>}
   */
  async delete(input, init = {}) {
    const call = await this.#prepare(input, init);
    const key = this.#keyFor(call, init, false);
    if (key === null && this.keyHeader !== null) return;
    await this.#control(call, key, "delete");
    this.#forget(call);
  }

  // -- requests ------------------------------------------------------------------------------

  /** Normalize (input, init) once: the body is read into bytes so every attempt resends it. */
  async #prepare(input, init) {
    const { durableKey, requestId, durableResume, offset, running, ...fetchInit } = init ?? {};
    const request = new Request(input, fetchInit);
    const headers = new Headers(request.headers);
    const signal = fetchInit.signal ?? (input instanceof Request ? input.signal : null);
    const resumeOnly = durableResume === true || isTrue(headers.get(RESUME));
    headers.delete(RESUME);
    const body = request.body === null ? null : new Uint8Array(await request.arrayBuffer());
    return {
      url: request.url,
      method: request.method,
      headers,
      body,
      signal,
      methodGiven: fetchInit.method !== undefined || input instanceof Request,
      credentials: request.credentials,
      redirect: request.redirect,
      referrerPolicy: request.referrerPolicy,
      resumeOnly,
      localId: requestId != null ? `id:${requestId}` : null,
    };
  }

  /** The fetch init of one attempt. */
  #init(call, key, extra, signal) {
    const headers = new Headers(call.headers);
    if (key !== null && this.keyHeader !== null) headers.set(this.keyHeader, key);
    for (const [name, value] of Object.entries(extra)) headers.set(name, value);
    return {
      method: call.method,
      headers,
      body: call.body,
      signal,
      credentials: call.credentials,
      redirect: call.redirect,
      referrerPolicy: call.referrerPolicy,
      // A browser cache must never answer for a stream: bytes differ by offset and by time.
      cache: "no-store",
    };
  }

  async #status(call, key, signal = call.signal) {
    const response = await this.#control(call, key, "status", { allowAbsent: true, signal });
    if (response.status === 404) return { state: "absent" };
    return response.json();
  }

  /** Send one control request; throws `DurableStreamError` unless the server understood it. */
  async #control(call, key, operation, { allowAbsent = false, signal = call.signal } = {}) {
    const method = call.method === "HEAD" || call.method === "OPTIONS" ? "GET" : call.method;
    const init = this.#init(call, key, { [CONTROL]: operation }, signal);
    init.method = method;
    if (method === "GET") init.body = null;
    const response = await this._fetch(call.url, init);
    const state = response.headers.get(STATE);
    const understood =
      (response.ok && (operation !== "status" || state !== null)) ||
      (allowAbsent && response.status === 404 && state === "absent");
    if (!understood) {
      await response.body?.cancel().catch(() => {});
      throw new DurableStreamError(
        `the server did not answer Durable-Control: ${operation} (HTTP ${response.status}): ` +
          `is DurableMiddleware in front of ${call.url}, and is the key sent where it reads it?`,
        { state: "protocol", key, status: response.status },
      );
    }
    return response;
  }

  async #resume(call, init) {
    const key = this.#keyFor(call, init, false);
    if (key === null && this.keyHeader !== null) return null;
    const status = await this.#status(call, key);
    if (status.state === "absent" || status.state === "failed") {
      this.#forget(call);
      return null;
    }
    if (init.running && status.state !== "running") return null;
    const offset = Number(init.offset ?? 0);
    try {
      return await this.#open(call, key, { offset, resumed: true, probe: false, resume: true });
    } catch (error) {
      // Gone between the status and the read.
      if (error instanceof DurableStreamError && FINAL_ERRORS.has(error.state)) return null;
      throw error;
    }
  }

  /**
   * Send the request (retrying network errors) and wrap a durable answer's body in a body that
   * reconnects. Non-durable and non-2xx answers come back as they are.
   */
  async #open(call, key, { offset, resumed, probe, resume = false }) {
    const controller = new AbortController();
    let done = false;
    const unlink = link(call.signal, controller, () => {
      if (!done && this.abortOnSignal) {
        // Not under the aborted signal itself, or the abort request would never leave.
        this.#control(call, key, "abort", { signal: null }).catch(() => {});
      }
    });
    const cursor = {
      key,
      offset, // the next byte this body needs, in the stream's byte numbering
      state: null,
      reader: null,
      skip: 0,
      attempts: 0,
      reconnects: 0,
    };
    // Offset 0 from `resume` says so explicitly: a server that reads it as "resume only" then
    // never starts the handler (ours may, so `resume` asks for the status first).
    const first = await this.#attempt(call, cursor, controller, {
      explicitOffset: resume,
      probe,
      initial: !resume,
    }).catch((error) => {
      unlink();
      throw error;
    });
    if (!first.ok || first.headers.get(STATE) === null || first.body === null) {
      // Returned as it is; the caller's signal still aborts its body through `controller`.
      done = true;
      if (first.ok) this.#forget(call); // not durable: nothing to resume later
      return markResponse(first, key, false, false);
    }
    resumed ||= first.headers.get(REPLAY) === "true";
    const client = this;
    const finish = (forget) => {
      done = true;
      unlink();
      if (forget) client.#forget(call);
    };

    const body = new ReadableStream(
      {
        async pull(stream) {
          try {
            while (true) {
              let result;
              try {
                result = await cursor.reader.read();
              } catch (error) {
                if (controller.signal.aborted) throw controller.signal.reason;
                await client.#reconnect(call, cursor, controller, error);
                continue;
              }
              if (result.done) {
                if (cursor.state !== "complete" && cursor.state !== "running") {
                  // Durable responses of other states never end cleanly: be strict.
                  throw client.#final(cursor, null);
                }
                finish(true);
                stream.close();
                return;
              }
              let chunk = result.value;
              if (cursor.skip > 0) {
                const dropped = Math.min(cursor.skip, chunk.byteLength);
                cursor.skip -= dropped;
                chunk = chunk.subarray(dropped);
                if (chunk.byteLength === 0) continue;
              }
              cursor.offset += chunk.byteLength;
              cursor.attempts = 0; // progress: the retry budget is per outage
              stream.enqueue(chunk);
              return;
            }
          } catch (error) {
            const forget = error instanceof DurableStreamError && FINAL_ERRORS.has(error.state);
            finish(forget);
            cursor.reader?.cancel().catch(() => {});
            throw error;
          }
        },
        cancel(reason) {
          finish(false);
          controller.abort(reason);
          return cursor.reader?.cancel(reason).catch(() => {});
        },
      },
      { highWaterMark: 0 },
    );
    const response = new Response(body, {
      status: first.status,
      statusText: first.statusText,
      headers: first.headers,
    });
    Object.defineProperty(response, "url", { value: first.url || call.url });
    Object.defineProperty(response, "reconnects", { get: () => cursor.reconnects });
    return markResponse(response, key, resumed, true);
  }

  /**
   * One request for the stream from `cursor.offset`, retried (with backoff) on network errors
   * and on 5xx answers during a reconnect. Sets `cursor.reader`, `.state` and `.skip` when the
   * answer is durable.
   */
  async #attempt(call, cursor, controller, { explicitOffset = false, probe = false, initial }) {
    let lastError = null;
    while (true) {
      if (controller.signal.aborted) throw controller.signal.reason;
      try {
        if (probe && cursor.offset === 0) {
          // Offset 0 would start the handler again for a failed stream: ask first.
          const status = await this.#status(call, cursor.key, controller.signal);
          if (FINAL_ERRORS.has(status.state) && status.state !== "aborted") {
            throw this.#final(cursor, null, status.state);
          }
        }
        const extra = cursor.offset > 0 || explicitOffset ? { [OFFSET]: String(cursor.offset) } : {};
        const response = await this._fetch(
          call.url,
          this.#init(call, cursor.key, extra, controller.signal),
        );
        if (initial && (!response.ok || response.headers.get(STATE) === null)) return response;
        if (response.status === 416) {
          const state = response.headers.get(STATE) ?? (await jsonState(response)) ?? "absent";
          throw this.#final(cursor, null, state, response.status);
        }
        if (response.status >= 500 || response.status === 408 || response.status === 429) {
          await response.body?.cancel().catch(() => {});
          throw new TypeError(`HTTP ${response.status} while reconnecting`);
        }
        if (!response.ok || response.body === null) {
          await response.body?.cancel().catch(() => {});
          throw this.#final(cursor, null, "protocol", response.status);
        }
        const start = Number(response.headers.get(OFFSET));
        if (!Number.isInteger(start) || response.headers.get(STATE) === null || start > cursor.offset) {
          await response.body.cancel().catch(() => {});
          throw new DurableStreamError(
            `the server answered a resume from byte ${cursor.offset} with ` +
              `Durable-Offset ${response.headers.get(OFFSET)}: the stream can't be continued`,
            { state: "protocol", key: cursor.key, offset: cursor.offset, status: response.status },
          );
        }
        cursor.skip = cursor.offset - start;
        cursor.state = response.headers.get(STATE);
        cursor.reader = response.body.getReader();
        return response;
      } catch (error) {
        if (error instanceof DurableStreamError || controller.signal.aborted) throw error;
        // A network error (TypeError from fetch) or a retryable status: back off and retry.
        lastError = error;
        cursor.attempts += 1;
        if (cursor.attempts > this.maxRetries) {
          throw new DurableStreamError(
            `could not reach ${call.url} after ${this.maxRetries} retries`,
            { state: "unreachable", key: cursor.key, offset: cursor.offset, cause: lastError },
          );
        }
        this.onReconnect?.({
          key: cursor.key,
          url: call.url,
          offset: cursor.offset,
          attempt: cursor.attempts,
          error,
        });
        await sleep(this.#delay(cursor.attempts), controller.signal);
      }
    }
  }

  /** The body broke mid-stream: reconnect from the byte we have, or fail for good. */
  async #reconnect(call, cursor, controller, error) {
    cursor.reader?.cancel().catch(() => {});
    cursor.reader = null;
    if (cursor.state !== "running" && cursor.state !== "complete") {
      // Served from a failed or aborted stream: its abnormal end is final.
      throw this.#final(cursor, error);
    }
    cursor.attempts += 1;
    if (cursor.attempts > this.maxRetries) {
      throw new DurableStreamError(`the stream broke ${this.maxRetries} times without progress`, {
        state: "unreachable",
        key: cursor.key,
        offset: cursor.offset,
        cause: error,
      });
    }
    this.onReconnect?.({
      key: cursor.key,
      url: call.url,
      offset: cursor.offset,
      attempt: cursor.attempts,
      error,
    });
    cursor.reconnects += 1;
    // The first retry after a drop goes at once: the usual cause is one dead connection.
    if (cursor.attempts > 1) await sleep(this.#delay(cursor.attempts - 1), controller.signal);
    // An explicit offset, even 0: a server that reads it as "resume only" never starts the
    // handler for it (see the probe in #attempt for servers that don't).
    await this.#attempt(call, cursor, controller, {
      probe: true,
      initial: false,
      explicitOffset: true,
    });
  }

  #final(cursor, cause, state = cursor.state ?? "failed", status = 0) {
    const why = {
      failed: "the stream failed on the server (its handler raised)",
      aborted: "the stream was aborted",
      absent: "the stream no longer exists on the server (deleted or expired)",
    };
    const message = why[state] ?? `the stream can't be continued (state ${state})`;
    return new DurableStreamError(`${message}; ${cursor.offset} bytes were delivered`, {
      state,
      key: cursor.key,
      offset: cursor.offset,
      status,
      cause: cause ?? undefined,
    });
  }

  #delay(attempt) {
    const base = Math.min(this.backoff.max, this.backoff.initial * 2 ** (attempt - 1));
    return base * (0.8 + 0.4 * Math.random());
  }

  // -- keys kept per request -----------------------------------------------------------------

  /**
   * The key for this request: given, or the kept one, or (when `create`) a new one that is
   * kept until the body is read to its end.
   */
  #keyFor(call, init, create) {
    const given = init?.durableKey ?? (this.keyHeader ? call.headers.get(this.keyHeader) : null);
    call.localId ??= `req:${hashRequest(call)}`;
    if (given != null) {
      if (create) this.#remember(call, String(given));
      return String(given);
    }
    let entry = call.localId === null ? null : this.#read(call.localId);
    if (entry === null && !create) {
      // Not this exact request: the latest one kept for the URL (e.g. resume after reload).
      const latest = this.#item(`url:${call.url}`);
      if (latest !== null) {
        entry = this.#read(latest);
        if (entry !== null) call.localId = latest;
      }
    }
    if (entry !== null) {
      // A control call or resume without init.method uses the method the stream started with.
      if (!call.methodGiven && !create) call.method = entry.method;
      return entry.key;
    }
    if (!create) return null;
    const key = newKey();
    this.#remember(call, key);
    return key;
  }

  #remember(call, key) {
    const entry = { key, url: call.url, method: call.method, at: Date.now() };
    this.#setItem(call.localId, JSON.stringify(entry));
    this.#setItem(`url:${call.url}`, call.localId);
  }

  #forget(call) {
    if (call.localId === null) return;
    if (this.#item(`url:${call.url}`) === call.localId) this.#removeItem(`url:${call.url}`);
    this.#removeItem(call.localId);
  }

  #read(localId) {
    const raw = this.#item(localId);
    if (raw === null) return null;
    try {
      const entry = JSON.parse(raw);
      if (typeof entry?.key === "string" && Date.now() - entry.at < this.ttl * 1000) return entry;
    } catch {
      // Not ours, or corrupt: treat as absent.
    }
    this.#removeItem(localId);
    return null;
  }

  #purgeExpired() {
    const storage = this.storage;
    if (typeof storage.key !== "function" || typeof storage.length !== "number") return;
    const names = [];
    for (let i = 0; i < storage.length; i++) {
      const name = storage.key(i);
      if (name?.startsWith(this.storagePrefix) && !name.startsWith(`${this.storagePrefix}url:`)) {
        names.push(name.slice(this.storagePrefix.length));
      }
    }
    for (const localId of names) this.#read(localId);
  }

  // Storage can throw (quota, privacy settings): a key we can't keep only costs resumability.
  #item(name) {
    try {
      return this.storage.getItem(this.storagePrefix + name);
    } catch {
      return null;
    }
  }
  #setItem(name, value) {
    try {
      this.storage.setItem(this.storagePrefix + name, value);
    } catch {
      // ignore: see above
    }
  }
  #removeItem(name) {
    try {
      this.storage.removeItem(this.storagePrefix + name);
    } catch {
      // ignore: see above
    }
  }
}

// -- helpers ---------------------------------------------------------------------------------

function markResponse(response, key, resumed, durable) {
  Object.defineProperties(response, {
    durableKey: { value: key, enumerable: true },
    resumed: { value: resumed, enumerable: true },
    durable: { value: durable, enumerable: true },
  });
  if (!("reconnects" in Object.getOwnPropertyDescriptors(response))) {
    Object.defineProperty(response, "reconnects", { value: 0 });
  }
  return response;
}

function isTrue(value) {
  return value !== null && ["1", "true", "yes"].includes(value.trim().toLowerCase());
}

async function jsonState(response) {
  try {
    const payload = await response.json();
    return typeof payload?.state === "string" ? payload.state : null;
  } catch {
    return null;
  }
}

/** Abort `controller` (and call `then`) when `signal` aborts; returns what unlinks them. */
function link(signal, controller, then) {
  if (!signal) return () => {};
  if (signal.aborted) {
    controller.abort(signal.reason);
    return () => {};
  }
  const onAbort = () => {
    controller.abort(signal.reason);
    then();
  };
  signal.addEventListener("abort", onAbort, { once: true });
  return () => signal.removeEventListener("abort", onAbort);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** A new random key: 128 bits, hex. (`crypto.randomUUID` needs a secure context.) */
function newKey() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A 106-bit hash of method, URL and body naming a request in storage. Not cryptographic (it
 * only has to tell a page's own requests apart) and synchronous: `crypto.subtle` needs a secure
 * context, which plain-http deployments on a LAN don't have.
 */
function hashRequest(call) {
  const head = new TextEncoder().encode(`${call.method} ${call.url}\n`);
  const body = call.body ?? new Uint8Array(0);
  return cyrb53(head, body, 0x9e3779b9) + cyrb53(head, body, 0x85ebca6b);
}

function cyrb53(head, body, seed) {
  let h1 = 0xdeadbeef ^ seed;
  let h2 = 0x41c6ce57 ^ seed;
  for (const bytes of [head, body]) {
    for (let i = 0; i < bytes.length; i++) {
      h1 = Math.imul(h1 ^ bytes[i], 2654435761);
      h2 = Math.imul(h2 ^ bytes[i], 1597334677);
    }
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return (4294967296 * (2097151 & h2) + (h1 >>> 0)).toString(16).padStart(14, "0");
}
