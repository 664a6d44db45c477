/**
 * pmhub browser client: one dependency-free ES module (no build step) that
 * speaks the pmhub wire protocol, version 1 (docs/protocol.md).
 *
 *     import { PmhubClient, api } from './client.js';
 *     const me = await api('api/me');
 *     const client = new PmhubClient({ url: new URL('ws', location.href), userId: me.id });
 *     client.addEventListener('message', (e) => show(e.detail.message));
 *     client.start();
 *     await client.send(2, 'Hello!');   // resolves with the stored Message
 *
 * The rules it keeps:
 *
 * - Every stored message is announced once (`message` event), whether it came
 *   live, from a `sync` replay or as the confirmation of our own send; ids
 *   already seen are dropped and each conversation is kept sorted by id,
 *   whatever order messages arrive in.
 * - A send is optimistic: it is in `client.pending` at once, with a
 *   `client_id` that makes resends idempotent. That outbox lives in `storage`
 *   per user, so it survives a reload and a new sign-in. Once a connection
 *   has finished its `sync`, the outbox goes out one message at a time, each
 *   after the previous one was answered: a `rate_limited` answer (retried
 *   after `retry_after`) can never let a later message overtake it. Only the
 *   server's copy (same `client_id`) or a refusal takes a message out of the
 *   sending state.
 * - The connection comes back by itself (exponential backoff with full
 *   jitter) and resumes with `sync` from `lastId`, the id up to which nothing
 *   is missing (kept in `storage`); only a refused session (close 1008, or
 *   `checkSession` answering false after a failed handshake) stops it, with
 *   an `auth` event.
 *
 * It behaves like the Python client (`pmhub.client.Client`), with the
 * browser's limits: a refused handshake is not visible to scripts, hence
 * `checkSession`.
 *
 * @module pmhub/client
 */

/**
 * A stored message, as the server sends it.
 * @typedef {object} Message
 * @property {number} id
 * @property {string} content
 * @property {number} sender_id
 * @property {number} receiver_id
 * @property {string} created_at  RFC 3339, UTC
 * @property {boolean} is_read
 * @property {?string} client_id
 */

/**
 * A message of ours the server has not confirmed yet.
 * @typedef {object} PendingMessage
 * @property {string} client_id
 * @property {number} recipient_id
 * @property {string} content
 * @property {'sending'|'failed'} status  `sending` also while disconnected
 * @property {string} error  why it failed ('' while sending)
 * @property {?string} code  the error code when failed
 * @property {string} created_at  when it was written (local clock, ISO 8601)
 */

/**
 * A stored outbox, as {@link PmhubClient.storedOutboxes} lists them.
 * @typedef {object} StoredOutbox
 * @property {number} userId
 * @property {?string} username
 * @property {PendingMessage[]} messages
 */

/** Storage keys: `pmhub.outbox.<user id>` and `pmhub.last_id.<user id>`. */
export const OUTBOX_PREFIX = 'pmhub.outbox.';
export const LAST_ID_PREFIX = 'pmhub.last_id.';

/** Close code of a refused or revoked session (and of sustained abuse). */
export const CLOSE_POLICY_VIOLATION = 1008;

const TYPING_EVERY_MS = 2000;   // is_typing:true at most this often (2/3 of the server's 3 s timeout)
const TYPING_IDLE_MS = 3000;    // is_typing:false this long after the last keystroke
const MAX_FRAME_BYTES = 64 * 1024;  // the server's default max_frame_size: a larger frame closes the connection

/**
 * A new idempotency key: `crypto.randomUUID()` where the browser has it (secure
 * contexts), else a random version-4 UUID from `crypto.getRandomValues`.
 * @returns {string}
 */
export function newClientId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * Insert `message` into `list` (sorted by id) at its place.
 * @param {Message[]} list
 * @param {Message} message
 * @returns {boolean} false if a message with that id is already there
 */
export function insertSorted(list, message) {
  let lo = 0;
  let hi = list.length;
  if (hi && list[hi - 1].id < message.id) lo = hi;  // the usual case: newest last
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid].id < message.id) lo = mid + 1;
    else hi = mid;
  }
  if (lo < list.length && list[lo].id === message.id) return false;
  list.splice(lo, 0, message);
  return true;
}

/**
 * Call the HTTP API with JSON: `credentials: 'same-origin'`, a JSON body with
 * `Content-Type: application/json` (the server answers 415 to any other
 * state-changing request), the parsed JSON answer back.
 * @param {string} path  relative to the page (e.g. `api/me`), so a mount prefix works
 * @param {{method?: string, body?: any, signal?: AbortSignal}} [options]
 * @returns {Promise<any>}
 * @throws {Error} with `.status` (0 when the server is unreachable), `.code`
 *   (the error code of the answer, e.g. `rate_limited`) and `.retryAfter`
 *   (seconds from `Retry-After`, or null)
 */
export async function api(path, { method = 'GET', body, signal } = {}) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' }, signal };
  if (body !== undefined || (method !== 'GET' && method !== 'HEAD')) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body === undefined ? {} : body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (cause) {
    if (cause && cause.name === 'AbortError') throw cause;
    throw httpError('The server cannot be reached.', 0, 'unreachable', null);
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data && typeof data.error === 'object' && data.error ? data.error : {};
    throw httpError(error.message || `HTTP ${response.status}`, response.status,
      error.code || null, retryAfter(response.headers.get('Retry-After')));
  }
  return data;
}

function httpError(message, status, code, after) {
  const error = new Error(message);
  error.status = status;
  error.code = code;
  error.retryAfter = after;
  return error;
}

function retryAfter(header) {
  if (!header) return null;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const at = Date.parse(header);
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

function defaultStorage() {
  try {
    return globalThis.localStorage || null;
  } catch (e) {
    return null;  // storage disabled: the outbox then lives in memory only
  }
}

function readJSON(storage, key) {
  try {
    const text = storage ? storage.getItem(key) : null;
    return text === null ? null : JSON.parse(text);
  } catch (e) {
    return null;
  }
}

function writeJSON(storage, key, value) {
  try {
    if (!storage) return;
    if (value === null) storage.removeItem(key);
    else storage.setItem(key, JSON.stringify(value));
  } catch (e) { /* quota or storage disabled: kept in memory only */ }
}

function parseOutbox(data) {
  if (!data || !Array.isArray(data.messages)) return null;
  const messages = [];
  for (const p of data.messages) {
    const recipient = p && (p.recipient_id ?? p.peer);  // `peer`: the first demo page's outbox
    if (!p || typeof p.client_id !== 'string' || !Number.isInteger(recipient) ||
        typeof p.content !== 'string' || (p.status !== 'sending' && p.status !== 'failed')) continue;
    messages.push({
      client_id: p.client_id, recipient_id: recipient, content: p.content, status: p.status,
      error: typeof p.error === 'string' ? p.error : '', code: typeof p.code === 'string' ? p.code : null,
      created_at: typeof p.created_at === 'string' ? p.created_at : new Date().toISOString(),
    });
  }
  return { username: typeof data.username === 'string' ? data.username : null, messages };
}

function copy(p) {
  return { client_id: p.client_id, recipient_id: p.recipient_id, content: p.content, status: p.status,
           error: p.error, code: p.code, created_at: p.created_at };
}

function isMessage(m) {
  return m && Number.isInteger(m.id) && Number.isInteger(m.sender_id) && Number.isInteger(m.receiver_id) &&
    typeof m.content === 'string';
}

/**
 * The client of one signed-in user. An `EventTarget`; every event is a
 * `CustomEvent` whose `detail` is the frame's data unless said otherwise:
 *
 * - `message`: a stored message, once per message (`detail.message`);
 *   live, from `sync`, or the confirmation of our own send.
 * - `typing`: `{user_id, recipient_id, is_typing}`.
 * - `presence`: `{user_id, is_online}` (see also {@link PmhubClient#isOnline}).
 * - `read`: `{reader_id, peer_id, up_to_id}`, after `is_read` was set on the
 *   stored messages it covers.
 * - `status`: `{status: 'connecting'|'open'|'offline', retryIn?, code?}`:
 *   `retryIn` (ms) when a reconnect is scheduled, `code` the close code.
 * - `outbox`: `{pending}`: the pending list changed (see {@link PmhubClient#pending}).
 * - `notice`: a `system` frame, plus `welcome: true` for the first one of
 *   each connection (the server's welcome).
 * - `error`: an `error` frame not tied to one of our sends.
 * - `auth`: `{code, reason}`: the session is gone (close 1008, or a refused
 *   handshake that `checkSession` confirmed); the client has stopped.
 * - `synced`: `{last_id}`: a `sync` finished (`has_more` false).
 */
export class PmhubClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string|URL} options.url  the WebSocket URL (`ws:` or `wss:`)
   * @param {number} options.userId  the signed-in user: keys the stored outbox and last id
   * @param {?Storage} [options.storage]  where those are kept (default `localStorage`; null: memory only)
   * @param {?string} [options.username]  stored with the outbox, for a login screen to name
   * @param {?function(): Promise<boolean>} [options.checkSession]  asked after a handshake
   *   that failed before opening (browsers do not say why): resolve false when the session is
   *   gone (e.g. `GET api/me` answered 401/403), true or throw to keep retrying
   * @param {number} [options.minDelay]  first reconnect delay cap, ms (500)
   * @param {number} [options.maxDelay]  largest reconnect delay, ms (15000)
   * @param {number} [options.stableAfter]  a connection open this long (ms), or one that
   *   delivered a message, resets the backoff (10000)
   * @param {number} [options.maxFrameBytes]  the server's frame limit (64 KiB): a larger send is
   *   refused at once (`too_long`), since the server would close the connection
   * @param {typeof WebSocket} [options.WebSocket]  the WebSocket class (for tests)
   */
  constructor({ url, userId, storage = defaultStorage(), username = null, checkSession = null,
                minDelay = 500, maxDelay = 15000, stableAfter = 10000, maxFrameBytes = MAX_FRAME_BYTES,
                WebSocket: Socket = globalThis.WebSocket } = {}) {
    super();
    if (!url) throw new TypeError('PmhubClient needs the WebSocket url');
    if (!Number.isInteger(userId)) throw new TypeError(`PmhubClient needs an integer userId, got ${userId}`);
    this.url = String(url);
    this.userId = userId;
    this.username = username;
    this._storage = storage;
    this._checkSession = checkSession;
    this._delays = { min: minDelay, max: maxDelay, stable: stableAfter };
    this._maxFrameBytes = maxFrameBytes;
    this._Socket = Socket;
    this._outboxKey = OUTBOX_PREFIX + userId;
    this._lastIdKey = LAST_ID_PREFIX + userId;

    this._status = 'offline';
    this._stopped = true;
    this._ws = null;
    this._openedAt = 0;
    this._delivered = false;      // this connection brought a message: it was a good one
    this._attempt = 0;
    this._reconnectTimer = null;
    this._welcomed = false;

    /** @type {Map<number, Message[]>} */
    this._threads = new Map();
    /** @type {Map<number, Message>} */
    this._byId = new Map();
    this._online = new Set();

    const stored = parseOutbox(readJSON(storage, this._outboxKey));
    /** @type {(PendingMessage & {notBefore?: number})[]} */
    this._outbox = stored ? stored.messages : [];
    this._forgotten = new Set();  // client_ids this client took out of the stored outbox
    this._waiters = new Map();    // client_id -> [{resolve, reject}] of send() / retry()
    this._inflight = null;        // client_id of the one send awaiting its answer
    this._holdTimer = null;       // the outbox head waits out a rate_limited answer

    const last = readJSON(storage, this._lastIdKey);
    this._lastId = Number.isInteger(last) && last > 0 ? last : 0;
    this._synced = false;         // this connection's sync finished
    this._maxSeen = 0;            // highest id this connection delivered
    this._syncTimer = null;
    this._reads = new Map();      // peer -> up_to_id not sent yet (offline)

    this._typingTo = null;
    this._typingSentAt = 0;
    this._typingTimer = null;

    this._onOnline = () => this.reconnectNow();
  }

  /**
   * Every stored outbox in `storage` (all users): for a login screen to say
   * what is still waiting, and for whom.
   * @param {?Storage} [storage]
   * @returns {StoredOutbox[]}
   */
  static storedOutboxes(storage = defaultStorage()) {
    const found = [];
    try {
      for (let i = 0; storage && i < storage.length; i++) {
        const key = storage.key(i);
        if (!key || !key.startsWith(OUTBOX_PREFIX)) continue;
        const userId = Number(key.slice(OUTBOX_PREFIX.length));
        const box = Number.isInteger(userId) ? parseOutbox(readJSON(storage, key)) : null;
        if (box && box.messages.length) found.push({ userId, ...box });
      }
    } catch (e) { /* storage disabled */ }
    return found;
  }

  /** @returns {'connecting'|'open'|'offline'} */
  get status() { return this._status; }

  /** Messages not confirmed yet, oldest first (copies). @returns {PendingMessage[]} */
  get pending() { return this._outbox.map(copy); }

  /** The id up to which nothing is missing: where the next `sync` starts. */
  get lastId() { return this._lastId; }

  /** Users whose presence is online (as far as this connection knows). @returns {Set<number>} */
  get online() { return new Set(this._online); }

  /** @param {number} userId @returns {boolean} */
  isOnline(userId) { return this._online.has(userId); }

  /**
   * The stored messages of the conversation with `peerId` that this client
   * has, sorted by id (a copy; the Message objects are shared).
   * @param {number} peerId
   * @returns {Message[]}
   */
  conversation(peerId) { return (this._threads.get(peerId) || []).slice(); }

  /** Peers this client holds messages with. @returns {number[]} */
  peers() { return [...this._threads.keys()]; }

  /** Open the connection (and keep it open) until {@link PmhubClient#stop}. */
  start() {
    if (!this._stopped) return;
    this._stopped = false;
    if (typeof globalThis.addEventListener === 'function') globalThis.addEventListener('online', this._onOnline);
    this._connect();
  }

  /** Close the connection and stop reconnecting. The outbox stays in storage. */
  stop() {
    if (this._stopped) return;
    this.stopTyping();
    this._stopped = true;
    if (typeof globalThis.removeEventListener === 'function') globalThis.removeEventListener('online', this._onOnline);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const ws = this._ws;
    this._disconnected();
    if (ws) ws.close(1000);
    this._setStatus('offline');
  }

  /** While waiting to reconnect, try now (e.g. a "retry now" button; also on the `online` event). */
  reconnectNow() {
    if (this._stopped || this._reconnectTimer === null) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._connect();
  }

  /**
   * Set where the next `sync` starts. Call it before {@link PmhubClient#start}
   * with the highest id of a complete snapshot you loaded (the newest
   * `last_message` of `GET api/conversations`): everything up to it is
   * reachable over HTTP and is not replayed.
   * @param {number} id
   */
  resumeFrom(id) {
    if (!Number.isInteger(id) || id < 0) throw new TypeError(`resumeFrom needs an id >= 0, got ${id}`);
    this._lastId = id;
    writeJSON(this._storage, this._lastIdKey, id);
  }

  /**
   * Merge messages loaded over HTTP (history pages, `last_message`s) into
   * the conversations, without `message` events. One of them that carries
   * the `client_id` of a pending send confirms it.
   * @param {Message[]} messages
   * @returns {number} how many were new
   */
  addHistory(messages) {
    let added = 0;
    for (const m of messages) {
      if (!isMessage(m)) continue;
      if (this._store(m)) added++;
      this._confirm(m);
    }
    return added;
  }

  /**
   * Send `content` to `recipientId`. It is pending at once (an `outbox`
   * event), sent now if connected or else on the next connect.
   * @param {number} recipientId
   * @param {string} content
   * @returns {Promise<Message>} the stored message once the server confirms it;
   *   rejected with an Error carrying `.code` (`forbidden`, `too_long`,
   *   `invalid_frame`, ...) when the server refuses it (it then stays in the
   *   outbox as failed, for {@link PmhubClient#retry} or {@link PmhubClient#discard}).
   *   `rate_limited` is not a failure: the send is retried after `retry_after`.
   */
  send(recipientId, content) {
    if (!Number.isInteger(recipientId)) throw new TypeError(`recipientId must be an integer, got ${recipientId}`);
    if (typeof content !== 'string') throw new TypeError('content must be a string');
    if (this._typingTo === recipientId) this.stopTyping();
    const entry = { client_id: newClientId(), recipient_id: recipientId, content, status: 'sending',
                    error: '', code: null, created_at: new Date().toISOString() };
    const size = new TextEncoder().encode(JSON.stringify(sendFrame(entry))).length;
    if (size > this._maxFrameBytes) {
      const error = new Error(`the message is ${size} bytes encoded; at most ${this._maxFrameBytes}`);
      return Promise.reject(Object.assign(error, { code: 'too_long' }));
    }
    this._outbox.push(entry);
    const promise = this._wait(entry.client_id);
    this._outboxChanged();
    this._pump();
    return promise;
  }

  /**
   * Send a failed message again (same `client_id`), after what is queued now.
   * @param {string} clientId
   * @returns {Promise<Message>} as {@link PmhubClient#send}
   */
  retry(clientId) {
    const i = this._outbox.findIndex((p) => p.client_id === clientId);
    if (i < 0) return Promise.reject(Object.assign(new Error('no such pending message'), { code: 'not_found' }));
    const [entry] = this._outbox.splice(i, 1);
    if (entry.status === 'failed') {
      Object.assign(entry, { status: 'sending', error: '', code: null, notBefore: 0 });
      this._outbox.push(entry);
    } else {
      this._outbox.splice(i, 0, entry);  // still on its way: keeps its place
    }
    const promise = this._wait(clientId);
    this._outboxChanged();
    this._pump();
    return promise;
  }

  /**
   * Drop a pending message from the outbox. One already on its way may still
   * be delivered; meant for failed ones.
   * @param {string} clientId
   */
  discard(clientId) {
    const i = this._outbox.findIndex((p) => p.client_id === clientId);
    if (i < 0) return;
    this._outbox.splice(i, 1);
    this._forgotten.add(clientId);
    this._settle(clientId, null, Object.assign(new Error('discarded'), { code: 'discarded' }));
    this._outboxChanged();
    if (this._inflight === clientId) {
      this._inflight = null;  // its answer, if any, is ignored
      this._pump();
    }
  }

  /**
   * Call on every keystroke in the composer for `recipientId`: sends
   * `is_typing: true` at most every 2 s, and `is_typing: false` 3 s after the
   * last call (or at once on {@link PmhubClient#stopTyping}, or when a
   * message to them is sent).
   * @param {number} recipientId
   */
  typing(recipientId) {
    if (this._typingTo !== null && this._typingTo !== recipientId) this.stopTyping();
    const now = Date.now();
    if (this._typingTo !== recipientId || now - this._typingSentAt >= TYPING_EVERY_MS) {
      if (this._frame({ type: 'typing_indicator', recipient_id: recipientId, is_typing: true })) this._typingSentAt = now;
    }
    this._typingTo = recipientId;
    clearTimeout(this._typingTimer);
    this._typingTimer = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  /** Say at once that we stopped typing (composer emptied, conversation left). */
  stopTyping() {
    clearTimeout(this._typingTimer);
    this._typingTimer = null;
    if (this._typingTo !== null && this._typingSentAt) {
      this._frame({ type: 'typing_indicator', recipient_id: this._typingTo, is_typing: false });
    }
    this._typingTo = null;
    this._typingSentAt = 0;
  }

  /**
   * Mark `peerId`'s messages up to `upToId` read (`mark_read`); while
   * disconnected it is sent on the next connect. Sets `is_read` on the
   * stored copies at once.
   * @param {number} peerId
   * @param {number} upToId
   */
  markRead(peerId, upToId) {
    for (const m of this._threads.get(peerId) || []) {
      if (m.sender_id === peerId && m.id <= upToId) m.is_read = true;
    }
    if (!this._frame({ type: 'mark_read', peer_id: peerId, up_to_id: upToId })) {
      this._reads.set(peerId, Math.max(upToId, this._reads.get(peerId) || 0));
    }
  }

  // -- connection ------------------------------------------------------------------

  _connect() {
    this._reconnectTimer = null;
    this._setStatus('connecting');
    let ws;
    try {
      ws = new this._Socket(this.url);
    } catch (e) {
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._openedAt = 0;
    this._delivered = false;
    ws.onopen = () => { if (this._ws === ws) this._opened(); };
    ws.onmessage = (event) => { if (this._ws === ws) this._onData(event.data); };
    ws.onclose = (event) => { if (this._ws === ws) this._closed(event); };
  }

  _opened() {
    this._openedAt = Date.now();
    this._welcomed = false;
    this._synced = false;
    this._maxSeen = 0;
    this._setStatus('open');
    this._frame({ type: 'sync', after_id: this._lastId });  // the outbox goes out once it is done
    for (const [peer, upTo] of this._reads) this._frame({ type: 'mark_read', peer_id: peer, up_to_id: upTo });
    this._reads.clear();
  }

  _closed(event) {
    const opened = this._openedAt > 0;
    const stable = opened && (this._delivered || Date.now() - this._openedAt >= this._delays.stable);
    this._disconnected();
    if (this._stopped) return;
    if (event.code === CLOSE_POLICY_VIOLATION) {
      this._sessionGone(event.code, event.reason || '');
      return;
    }
    if (stable) this._attempt = 0;  // back off only while it keeps failing
    if (!opened && this._checkSession) {
      // A refused handshake looks like any failure (1006): ask whether the session is still valid.
      this._setStatus('offline', { code: event.code });
      Promise.resolve()
        .then(() => this._checkSession())
        .then((valid) => (valid === false ? this._sessionGone(event.code, 'session refused') : this._scheduleReconnect(event.code)),
              () => this._scheduleReconnect(event.code));
      return;
    }
    this._scheduleReconnect(event.code);
  }

  // Forget everything that belonged to the connection that just ended.
  _disconnected() {
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = null;
    this._openedAt = 0;
    this._synced = false;
    clearTimeout(this._syncTimer);
    clearTimeout(this._holdTimer);
    this._holdTimer = null;
    this._inflight = null;  // sent again on the next connection, same client_id
    this._typingSentAt = 0;
    if (this._online.size) this._online.clear();
  }

  _scheduleReconnect(code) {
    if (this._stopped || this._reconnectTimer !== null) return;
    const cap = Math.min(this._delays.max, this._delays.min * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 30);
    const delay = Math.round(Math.random() * cap);  // "full jitter"
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
    this._setStatus('offline', { retryIn: delay, code });
  }

  _sessionGone(code, reason) {
    this.stop();
    this._emit('auth', { code, reason });
  }

  _setStatus(status, extra = {}) {
    this._status = status;
    this._emit('status', { status, ...extra });
  }

  _frame(frame) {
    const ws = this._ws;
    if (!ws || this._status !== 'open') return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // -- frames from the server ------------------------------------------------------

  _onData(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (!f || typeof f !== 'object') return;
    switch (f.type) {
      case 'system':
        this._emit('notice', { ...f, welcome: !this._welcomed });
        this._welcomed = true;
        break;
      case 'private_message':
        if (isMessage(f.message)) this._onMessage(f);
        break;
      case 'typing_indicator':
        this._emit('typing', f);
        break;
      case 'user_online_status':
        if (f.is_online) this._online.add(f.user_id);
        else this._online.delete(f.user_id);
        this._emit('presence', f);
        break;
      case 'messages_read':
        this._onRead(f);
        break;
      case 'sync_complete':
        if (this._synced) break;
        this._noteId(f.last_id);
        if (f.has_more) {
          this._frame({ type: 'sync', after_id: f.last_id });
        } else {
          // Everything before the sync came in it, everything since live.
          this._noteId(this._maxSeen);
          this._synced = true;
          this._emit('synced', { last_id: this._lastId });
          this._pump();
        }
        break;
      case 'error':
        this._onError(f);
        break;
      default:  // a newer server's frame: ignored, as the protocol allows
    }
  }

  _onMessage(frame) {
    const m = frame.message;
    this._delivered = true;
    this._maxSeen = Math.max(this._maxSeen, m.id);
    if (this._synced) this._noteId(m.id);  // during a sync, a live id may be ahead of the replay
    const isNew = this._store(m);
    const confirmed = this._confirm(m, true);
    if (isNew) this._emit('message', frame);
    if (confirmed) {
      this._outboxChanged();
      this._pump();
    }
  }

  // Keep `m` in its conversation; false if its id was there already.
  _store(m) {
    const old = this._byId.get(m.id);
    if (old) {
      if (m.is_read) old.is_read = true;
      return false;
    }
    const peer = m.sender_id === this.userId ? m.receiver_id : m.sender_id;
    let list = this._threads.get(peer);
    if (!list) this._threads.set(peer, (list = []));
    insertSorted(list, m);
    this._byId.set(m.id, m);
    return true;
  }

  // The server's copy of one of our pending sends: it leaves the outbox.
  _confirm(m, quiet = false) {
    if (m.sender_id !== this.userId || !m.client_id) return false;
    const i = this._outbox.findIndex((p) => p.client_id === m.client_id);
    if (i < 0) return false;
    this._outbox.splice(i, 1);
    this._forgotten.add(m.client_id);
    if (this._inflight === m.client_id) this._inflight = null;
    this._settle(m.client_id, this._byId.get(m.id) || m, null);
    if (!quiet) {
      this._outboxChanged();
      this._pump();
    }
    return true;
  }

  _onRead(f) {
    let author, upTo = f.up_to_id;
    if (f.peer_id === this.userId) author = this.userId;       // they read mine
    else if (f.reader_id === this.userId) author = f.peer_id;  // I read theirs, on another device
    else return;
    const peer = author === this.userId ? f.reader_id : f.peer_id;
    for (const m of this._threads.get(peer) || []) {
      if (m.sender_id === author && m.id <= upTo) m.is_read = true;
    }
    this._emit('read', f);
  }

  _onError(f) {
    if (f.client_id) {
      const i = this._outbox.findIndex((p) => p.client_id === f.client_id);
      if (i < 0) return;  // answered already (a resend's late error) or discarded
      const entry = this._outbox[i];
      if (this._inflight === entry.client_id) this._inflight = null;
      if (f.code === 'rate_limited') {
        entry.notBefore = Date.now() + seconds(f.retry_after);  // still first in line
      } else {
        entry.status = 'failed';
        entry.error = f.message || f.code;
        entry.code = f.code;
        this._settle(entry.client_id, null, Object.assign(new Error(entry.error), { code: f.code }));
        this._outboxChanged();
      }
      this._pump();
      return;
    }
    if (f.code === 'rate_limited' && !this._synced && this._status === 'open') {
      // Only sends and syncs are rate limited, and every send has a client_id:
      // a sync page costs a token of the message rate, so ask again when allowed.
      const ws = this._ws;
      clearTimeout(this._syncTimer);
      this._syncTimer = setTimeout(() => {
        if (this._ws === ws) this._frame({ type: 'sync', after_id: this._lastId });
      }, seconds(f.retry_after));
      return;
    }
    this._emit('error', f);
  }

  _noteId(id) {
    if (Number.isInteger(id) && id > this._lastId) {
      this._lastId = id;
      writeJSON(this._storage, this._lastIdKey, id);
    }
  }

  // -- outbox ----------------------------------------------------------------------

  // Send the first message waiting to go, once this connection is synced and
  // the previous send was answered; after `rate_limited`, not before its time.
  _pump() {
    if (this._status !== 'open' || !this._synced || this._inflight !== null || this._holdTimer !== null) return;
    const head = this._outbox.find((p) => p.status === 'sending');
    if (!head) return;
    const wait = (head.notBefore || 0) - Date.now();
    if (wait > 0) {
      this._holdTimer = setTimeout(() => {
        this._holdTimer = null;
        this._pump();
      }, wait);
      return;
    }
    if (this._frame(sendFrame(head))) this._inflight = head.client_id;
  }

  _wait(clientId) {
    return new Promise((resolve, reject) => {
      const waiting = this._waiters.get(clientId) || [];
      waiting.push({ resolve, reject });
      this._waiters.set(clientId, waiting);
    });
  }

  _settle(clientId, message, error) {
    const waiting = this._waiters.get(clientId) || [];
    this._waiters.delete(clientId);
    for (const w of waiting) {
      if (error) w.reject(error);
      else w.resolve(message);
    }
  }

  // Store the outbox (merged with what other tabs of this user stored) and tell listeners.
  _outboxChanged() {
    const stored = parseOutbox(readJSON(this._storage, this._outboxKey));
    const mine = new Set(this._outbox.map((p) => p.client_id));
    const others = stored ? stored.messages.filter((p) => !mine.has(p.client_id) && !this._forgotten.has(p.client_id)) : [];
    const messages = [...others, ...this._outbox.map(copy)];
    const username = this.username ?? (stored ? stored.username : null);
    writeJSON(this._storage, this._outboxKey, messages.length ? { username, messages } : null);
    this._emit('outbox', { pending: this.pending });
  }
}

function sendFrame(p) {
  return { type: 'private_message', recipient_id: p.recipient_id, content: p.content, client_id: p.client_id };
}

function seconds(value) {
  const s = Number(value);
  return Number.isFinite(s) && s > 0 ? Math.min(s, 3600) * 1000 : 1000;
}
