/**
 * Type declarations for durable-fetch.js, the browser client of durable_asgi.
 *
 *     import { DurableFetchClient } from "/_durable/durable-fetch.js";
 *     const client = new DurableFetchClient();
 *     const response = await client.fetch("/api/chat", { method: "POST", body });
 */

/** Anything with the getItem/setItem/removeItem of `Storage` (localStorage, sessionStorage). */
export interface StorageLike {
  getItem(name: string): string | null;
  setItem(name: string, value: string): void;
  removeItem(name: string): void;
  /** With `key` and `length` too, expired entries are purged when a client is made. */
  key?(index: number): string | null;
  readonly length?: number;
}

export interface ReconnectInfo {
  /** The stream's key. */
  key: string | null;
  url: string;
  /** Bytes of the body delivered so far: the next request asks for the stream from here. */
  offset: number;
  /** Attempt number within this outage (reset whenever bytes arrive). */
  attempt: number;
  /** What broke: a network error, a retryable HTTP status, an abnormal end. */
  error: unknown;
}

export interface DurableFetchOptions {
  /** The request header carrying the key. `null` when the server takes keys from the URL or
   * body: no key header is sent. Default "Durable-Key". */
  keyHeader?: string | null;
  /** Where per-request keys are kept so a reload finds them. Default `localStorage` (memory
   * where there is none). */
  storage?: StorageLike;
  /** Prefix of the storage entries. Default "durable-fetch:". */
  storagePrefix?: string;
  /** Seconds a kept key is trusted (match the server's `ttl`). Default 21600. */
  ttl?: number;
  /** Reconnect attempts in a row without receiving a byte before giving up. Default 10. */
  maxRetries?: number;
  /** Milliseconds before attempt n: min(max, initial * 2^(n-1)), ±20 % jitter; the first
   * retry after a dropped body goes at once. Default {initial: 100, max: 5000}. */
  backoff?: { initial?: number; max?: number };
  /** The fetch used underneath. Default `globalThis.fetch`. */
  fetch?: (input: RequestInfo | URL, init?: RequestInit) => Promise<Response>;
  /** When a request's `signal` aborts, also stop the handler on the server. Default false:
   * the signal only stops this page reading, and the stream can be resumed. */
  abortOnSignal?: boolean;
  /** Called before each reconnect attempt. */
  onReconnect?: (info: ReconnectInfo) => void;
}

export interface DurableRequestInit extends RequestInit {
  /** The stream's key. Default: the key header if the request has one, else a key generated
   * and kept per request (see `requestId`). */
  durableKey?: string;
  /** Names the request for the kept key (instead of a hash of method + URL + body), e.g. a
   * chat or message id, so `resume` finds it after a reload. */
  requestId?: string;
  /** Only continue a stream that is still running (as `resume` with `running: true`); answer
   * 204 when there is none, as the AI SDK's `reconnectToStream` expects. Also asked for with
   * the request header `Durable-Resume: true`, which is not sent. */
  durableResume?: boolean;
}

export interface DurableResumeInit extends DurableRequestInit {
  /** The byte of the stream to continue from. Default 0 (the whole body again). */
  offset?: number;
  /** Only a stream still running: a finished one gives null too. Default false. */
  running?: boolean;
}

export type DurableControlInit = Pick<
  DurableRequestInit,
  "durableKey" | "requestId" | "method" | "body" | "headers" | "credentials" | "signal"
>;

/** A `Response` whose body is the whole stream, exactly once, across reconnects. */
export interface DurableResponse extends Response {
  /** The stream's key (null for a 204 "nothing to resume"). */
  readonly durableKey: string | null;
  /** Served from the store: the handler was already running or done. */
  readonly resumed: boolean;
  /** The server answered with durable headers. A non-durable body is passed on untouched. */
  readonly durable: boolean;
  /** Reconnect attempts made so far while reading the body. */
  readonly reconnects: number;
}

export type DurableState = "running" | "complete" | "failed" | "aborted";

/** The server's answer to `Durable-Control: status`. */
export type DurableStatus =
  | { state: "absent" }
  | {
      key: string;
      state: DurableState;
      in_progress: boolean;
      /** Bytes stored so far. */
      offset: number;
      chunks: number;
      readers: number;
      status_code: number | null;
      created_at: number;
      updated_at: number;
      expires_at: number | null;
    };

/**
 * Why a durable body (or a control call) failed: `state` is "failed" (the handler raised),
 * "aborted" (then `name` is "AbortError"), "absent" (deleted or expired), "unreachable" (no
 * answer within `maxRetries`; see `cause`) or "protocol" (not a durable_asgi answer).
 */
export class DurableStreamError extends Error {
  constructor(
    message: string,
    details?: { state: string; key?: string | null; offset?: number; status?: number; cause?: unknown },
  );
  readonly state: "failed" | "aborted" | "absent" | "unreachable" | "protocol" | string;
  readonly key: string | null;
  /** Bytes delivered before the error. */
  readonly offset: number;
  /** HTTP status of the answer that ended it, or 0. */
  readonly status: number;
}

/** A `Storage`-like map that lives as long as the page. */
export class MemoryStorage implements StorageLike {
  readonly length: number;
  key(index: number): string | null;
  getItem(name: string): string | null;
  setItem(name: string, value: string): void;
  removeItem(name: string): void;
  clear(): void;
}

/** A fetch that survives dropped connections and reloads, for durable_asgi servers. */
export class DurableFetchClient {
  constructor(options?: DurableFetchOptions);

  readonly keyHeader: string | null;
  readonly storage: StorageLike;
  readonly maxRetries: number;

  /** `fetch`'s signature (bound: hand it to the AI SDK's `DefaultChatTransport`). The body is
   * the whole stream, exactly once, across network errors and abnormal ends. */
  fetch(input: RequestInfo | URL, init?: DurableRequestInit): Promise<DurableResponse>;

  /** Continue the stream this request started, after a reload: the body from `init.offset`
   * (default 0), or null when there is nothing to continue (or, with `init.running`, when it
   * has finished). Never starts the handler. */
  resume(input: RequestInfo | URL, init?: DurableResumeInit): Promise<DurableResponse | null>;

  /** The stream's status, or `{state: "absent"}`. */
  status(input: RequestInfo | URL, init?: DurableControlInit): Promise<DurableStatus>;

  /** Stop the handler; bytes so far stay readable; readers end with an "aborted" error. */
  abort(input: RequestInfo | URL, init?: DurableControlInit): Promise<void>;

  /** Stop the stream if running, remove it from the server and forget its key here. */
  delete(input: RequestInfo | URL, init?: DurableControlInit): Promise<void>;
}
