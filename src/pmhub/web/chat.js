/**
 * pmhub demo chat page: the screens (login, chat list, conversation) on top
 * of the protocol client (client.js), which owns the connection, the outbox
 * and the messages. This file only decides what to show.
 *
 * - Signs in over the HTTP API, loads the chat list (`api/users`,
 *   `api/conversations`) and each conversation's history (`api/messages/…`),
 *   then lets the client keep the WebSocket and `sync` so nothing is lost.
 * - User-provided text is only ever set as textContent, never as HTML.
 * - No inline script or style (the page runs under `script-src 'self'`).
 * - The open conversation is in the URL hash (`#peer=2`), so a reload keeps it.
 */
import { PmhubClient, api } from './client.js';

const WS_URL = (() => {
  const url = new URL('ws', location.href);  // relative to the page: works under a mount prefix
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.href;
})();
const MAX_LEN = 4000;          // characters (code points), as the server counts them
const TYPING_HIDE_MS = 6000;   // hide someone's "typing…" if neither refreshed nor ended
const NEAR_BOTTOM_PX = 80;     // closer than this to the end counts as "at the newest message"
const GROUP_MS = 5 * 60 * 1000;  // messages of one sender this close together form a group
const phone = matchMedia('(max-width: 700px)');
const $ = (id) => document.getElementById(id);

/** Everything about the signed-in session; replaced at each sign-in. */
let S = null;
/** The server's welcome is shown once per page load, not on every reconnect. */
let welcomeShown = false;

function newSession(me) {
  return {
    me, client: null, users: new Map(), threads: new Map(), directoryLoaded: false,
    open: null, pushed: false,            // pushed: opening it added a history entry (Back pops it)
    typingFrom: new Map(),                // user id -> timer that hides their "typing…"
    nodes: new Map(),                     // render key -> element of the open conversation
    forceBottom: false, jump: false,
  };
}

function thread(peer) {
  let t = S.threads.get(peer);
  if (!t) {
    t = { peer, unread: 0, loaded: false, loading: null, hasMore: false, draft: '' };
    S.threads.set(peer, t);
  }
  return t;
}

// ---------- small helpers ----------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}
function nameOf(id) {
  if (S && id === S.me.id) return S.me.username;
  const u = S && S.users.get(id);
  return u ? u.username : `user ${id}`;
}
function peerOf(m) { return m.sender_id === S.me.id ? m.receiver_id : m.sender_id; }
function parseTime(iso) { return new Date(String(iso).replace(/(\.\d{3})\d+/, '$1')); }
function timeOf(d) { return isNaN(d) ? '' : d.toLocaleTimeString([], { hour: 'numeric', minute: '2-digit' }); }
function dayKey(d) { return `${d.getFullYear()}-${d.getMonth() + 1}-${d.getDate()}`; }
function daysAgo(d) {
  const midnight = (x) => new Date(x.getFullYear(), x.getMonth(), x.getDate());
  return Math.round((midnight(new Date()) - midnight(d)) / 86400000);  // round: DST days are 23 or 25 h
}
function dayLabel(d) {
  const ago = daysAgo(d);
  if (ago === 0) return 'Today';
  if (ago === 1) return 'Yesterday';
  const year = d.getFullYear() === new Date().getFullYear() ? {} : { year: 'numeric' };
  return d.toLocaleDateString([], { weekday: 'long', day: 'numeric', month: 'long', ...year });
}
function shortWhen(iso) {
  const d = parseTime(iso);
  if (isNaN(d)) return '';
  const ago = daysAgo(d);
  if (ago === 0) return timeOf(d);
  if (ago === 1) return 'Yesterday';
  return d.toLocaleDateString([], ago < 7 ? { weekday: 'short' } : { day: 'numeric', month: 'short' });
}
function plural(n, what) { return `${n} ${what}${n === 1 ? '' : 's'}`; }

function notice(text, kind) {
  const box = $('notices');
  const n = box.appendChild(el('div', 'toast' + (kind ? ' ' + kind : ''), text));
  setTimeout(() => n.remove(), 6000);
  while (box.children.length > 4) box.firstChild.remove();
}

function composeHint(text, isError) {
  const h = $('compose-hint');
  h.textContent = text || '';
  h.classList.toggle('error', !!isError);
}

// ---------- rendering is batched: render('people', 'thread') marks, one microtask draws ----------
const dirty = new Set();
function render(...parts) {
  if (!dirty.size) queueMicrotask(draw);
  for (const p of parts) dirty.add(p);
}
function draw() {
  const parts = new Set(dirty);
  dirty.clear();
  if (!S) return;
  if (parts.has('people')) renderPeople();
  if (parts.has('head')) renderHead();
  if (parts.has('typing')) renderTyping();
  if (parts.has('thread')) renderThread();
  renderTitle();
  maybeMarkRead();
}

// ---------- login ----------
function showLogin(message) {
  $('app').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('notices').replaceChildren();
  document.title = 'pmhub chat';
  renderLoginOutbox();
  $('username').focus();
}

// What is still queued in this browser, and for whom (another user's is never shown or sent).
function renderLoginOutbox() {
  const lines = [];
  for (const box of PmhubClient.storedOutboxes()) {
    const who = box.username || `user ${box.userId}`;
    const sending = box.messages.filter((p) => p.status === 'sending').length;
    const failed = box.messages.length - sending;
    if (sending) lines.push(`${plural(sending, 'unsent message')} will be sent when you log in again as ${who}.`);
    if (failed) lines.push(`${plural(failed, 'message')} that could not be sent ${failed === 1 ? 'is' : 'are'} kept for ${who}.`);
  }
  $('login-outbox').replaceChildren(...lines.map((text) => el('p', '', text)));
  $('login-outbox').hidden = !lines.length;
}

function loginError(err) {
  if (err.status === 429) {
    const wait = err.retryAfter != null ? `in ${plural(Math.ceil(err.retryAfter), 'second')}` : 'later';
    return `Too many sign-in attempts. Try again ${wait}.`;
  }
  if (err.status === 401) return 'Wrong username or password.';
  if (err.status === 0) return 'The server cannot be reached. Try again in a moment.';
  return err.message;
}

$('login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const button = $('login-form').querySelector('button[type=submit]');
  $('login-error').textContent = '';
  button.disabled = true;
  try {
    const me = await api('api/login', { method: 'POST', body: { username: $('username').value.trim(), password: $('password').value } });
    $('password').value = '';
    start(me);
  } catch (err) {
    $('login-error').textContent = loginError(err);
  } finally {
    button.disabled = false;
  }
});

$('logout').addEventListener('click', async () => {
  endSession();
  history.replaceState(null, '', location.pathname + location.search);
  $('logout').disabled = true;
  try {
    await api('api/logout', { method: 'POST' });
  } catch (e) { /* offline: the cookie stays; fine */ }
  $('logout').disabled = false;
  showLogin('');
});

function endSession() {
  if (!S) return;
  S.client.stop();
  for (const timer of S.typingFrom.values()) clearTimeout(timer);
  S = null;
}

function toLogin(message) {
  endSession();
  showLogin(message);
}

// Asked by the client after a handshake failed before opening: is the session still valid?
async function checkSession() {
  const r = await fetch('api/me', { credentials: 'same-origin' });  // throws when unreachable: keep retrying
  return !(r.status === 401 || r.status === 403);
}

async function start(me) {
  endSession();
  const st = S = newSession(me);
  const client = st.client = new PmhubClient({ url: WS_URL, userId: me.id, username: me.username, checkSession });
  const on = (type, handler) => client.addEventListener(type, (e) => { if (S === st) handler(e.detail); });
  on('status', onStatus);
  on('message', (d) => onMessage(d.message));
  on('outbox', () => render('people', 'thread'));
  on('typing', (d) => { if (d.recipient_id === S.me.id) setTyping(d.user_id, d.is_typing); });
  on('presence', (d) => { if (!d.is_online) setTyping(d.user_id, false); render('people', 'head'); });
  on('read', (d) => {
    if (d.reader_id === S.me.id) thread(d.peer_id).unread = 0;  // read on another device
    render('people', 'thread');
  });
  on('notice', (d) => {
    if (d.welcome && welcomeShown) return;
    if (d.welcome) welcomeShown = true;
    notice(d.message);
  });
  on('error', (d) => notice(d.message || d.code, 'error'));
  on('auth', (d) => toLogin(d.code === 1008
    ? 'Your session was ended (signed out). Please sign in again.'
    : 'Your session has expired. Please sign in again.'));

  $('login').hidden = true;
  $('app').hidden = false;
  $('me').textContent = me.username;
  showView();
  const newest = await loadDirectory(st);
  if (S !== st) return;
  // Everything up to the newest message of that snapshot is counted in it and
  // reachable as history: sync only what is newer.
  if (newest != null) client.resumeFrom(newest);
  client.start();
  const peer = peerFromHash();
  if (peer != null) openConversation(peer, 'none');
  render('people');
}

// The chat list: who one may talk to, and the conversations with their unread counts.
// Returns the newest message id in it (null if it could not be loaded).
async function loadDirectory(st) {
  try {
    const [users, conversations] = await Promise.all([api('api/users'), api('api/conversations')]);
    if (S !== st) return;
    for (const u of users) if (u.id !== st.me.id) st.users.set(u.id, u);
    let newest = 0;
    for (const c of conversations) {
      thread(c.peer_id).unread = c.unread_count || 0;
      if (c.last_message) {
        st.client.addHistory([c.last_message]);
        newest = Math.max(newest, c.last_message.id);
      }
    }
    st.directoryLoaded = true;
    render('people', 'head');
    return newest;
  } catch (err) {
    if (S !== st) return null;
    if (err.status === 401 || err.status === 403) toLogin('Your session has expired. Please sign in again.');
    else notice('Could not load your chats: ' + err.message, 'error');
    return null;
  }
}

// ---------- the client's events ----------
function onStatus(d) {
  const conn = $('conn');
  conn.classList.toggle('up', d.status === 'open');
  conn.textContent = d.status === 'open' ? 'connected' : d.status === 'connecting' ? 'connecting…'
    : navigator.onLine === false ? 'offline (no network)' : 'offline, reconnecting…';
  if (d.status === 'open') {
    if (!S.directoryLoaded) loadDirectory(S);
    if (S.open != null && !thread(S.open).loaded) loadHistory(thread(S.open));
  } else {
    for (const id of [...S.typingFrom.keys()]) setTyping(id, false);
  }
  render('people', 'head', 'thread');
}

function onMessage(m) {
  const peer = peerOf(m);
  const t = thread(peer);
  if (m.sender_id === peer) {
    setTyping(peer, false);
    if (!m.is_read) t.unread++;  // maybeMarkRead clears it when the message is seen
    if (S.open === peer && !nearBottom()) S.jump = true;
  }
  render('people', 'thread');
}

function setTyping(userId, on) {
  clearTimeout(S.typingFrom.get(userId));
  S.typingFrom.delete(userId);
  if (on) {
    S.typingFrom.set(userId, setTimeout(() => {
      if (!S) return;
      S.typingFrom.delete(userId);
      render('people', 'typing');
    }, TYPING_HIDE_MS));
  }
  render('people', 'typing');
}

// The open conversation's unread messages are read once it is on screen at its newest message.
function maybeMarkRead() {
  if (!S || S.open == null || document.visibilityState !== 'visible' || !nearBottom()) return;
  const t = thread(S.open);
  if (!t.loaded) return;
  let upTo = 0;
  for (const m of S.client.conversation(t.peer)) if (m.sender_id === t.peer && !m.is_read) upTo = m.id;
  if (upTo) S.client.markRead(t.peer, upTo);
  if (t.unread) {
    t.unread = 0;
    render('people');
  }
}

function nearBottom() {
  const box = $('messages');
  return box.clientHeight > 0 && box.scrollHeight - box.scrollTop - box.clientHeight < NEAR_BOTTOM_PX;
}

// ---------- navigation: list <-> conversation, kept in the URL hash ----------
function peerFromHash() {
  const match = /^#peer=(\d+)$/.exec(location.hash);
  const peer = match ? Number(match[1]) : null;
  return peer != null && S && (S.users.has(peer) || S.threads.has(peer)) && peer !== S.me.id ? peer : null;
}

// how: 'push' (a click: Back returns to the list), 'replace', or 'none' (the URL already says so)
function openConversation(peer, how = 'push') {
  if (!S) return;
  if (S.open === peer) return showView();
  const previous = S.open;
  if (previous != null) {
    thread(previous).draft = $('text').value;
    S.client.stopTyping();
  }
  if (how === 'push' && previous == null) {
    history.pushState({ peer }, '', `#peer=${peer}`);
    S.pushed = true;
  } else if (how !== 'none') {
    history.replaceState(history.state, '', `#peer=${peer}`);
  }
  S.open = peer;
  const t = thread(peer);
  $('text').value = t.draft;
  autosize();
  composeHint('');
  S.nodes.clear();
  $('list').replaceChildren();
  S.jump = false;
  S.forceBottom = true;
  showView();
  render('people', 'head', 'typing', 'thread');
  if (!phone.matches) $('text').focus();
  if (!t.loaded) loadHistory(t);
}

function closeConversation(how = 'replace') {
  if (!S || S.open == null) return;
  thread(S.open).draft = $('text').value;
  S.client.stopTyping();
  S.open = null;
  S.pushed = false;
  if (how === 'replace') history.replaceState(null, '', location.pathname + location.search);
  showView();
  render('people');
}

function showView() {
  const open = S && S.open != null;
  $('app').dataset.view = open ? 'conv' : 'list';
  $('empty').hidden = open;
  $('conversation').hidden = !open;
}

$('back').addEventListener('click', () => {
  if (S && S.pushed) history.back();  // popstate closes it, and the browser's Back stays in step
  else closeConversation('replace');
});

window.addEventListener('popstate', () => {
  if (!S) return;
  const peer = peerFromHash();
  if (peer != null) openConversation(peer, 'none');
  else closeConversation('none');
});

async function loadHistory(t) {
  const st = S;
  if (t.loading) return;
  t.loading = api(`api/messages/${t.peer}?limit=50`);
  try {
    const page = await t.loading;
    if (S !== st) return;
    st.client.addHistory(page.messages);
    t.hasMore = page.has_more;
    t.loaded = true;
  } catch (err) {
    if (S !== st) return;
    if (err.status === 401 || err.status === 403) return toLogin('Your session has expired. Please sign in again.');
    if (err.status !== 0) notice('Could not load messages: ' + err.message, 'error');
    return;  // unreachable: loaded again when the connection is back
  } finally {
    t.loading = null;
  }
  if (S.open === t.peer) S.forceBottom = true;
  render('thread');
}

$('older').addEventListener('click', async () => {
  const st = S;
  const t = S && S.open != null && thread(S.open);
  const loaded = t ? S.client.conversation(t.peer) : [];
  if (!loaded.length) return;
  try {
    const page = await api(`api/messages/${t.peer}?limit=50&before_id=${loaded[0].id}`);
    if (S !== st) return;
    const box = $('messages');
    const fromBottom = box.scrollHeight - box.scrollTop;
    st.client.addHistory(page.messages);
    t.hasMore = page.has_more;
    if (S.open !== t.peer) return;
    renderThread();
    box.scrollTop = box.scrollHeight - fromBottom;  // keep the view where it was
  } catch (err) {
    notice('Could not load older messages: ' + err.message, 'error');
  }
});

$('messages').addEventListener('scroll', () => {
  if (S && nearBottom()) {
    if (S.jump) {
      S.jump = false;
      $('jump').hidden = true;
    }
    maybeMarkRead();
  }
}, { passive: true });

$('jump').addEventListener('click', () => {
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
  S.jump = false;
  $('jump').hidden = true;
  maybeMarkRead();
});

document.addEventListener('visibilitychange', () => { if (S) maybeMarkRead(); });

// ---------- composing ----------
function sendMessage() {
  if (!S || S.open == null) return;
  const content = $('text').value.trim();
  if (!content) return;
  const n = [...content].length;
  if (n > MAX_LEN) return composeHint(`Too long: ${n} characters (at most ${MAX_LEN}).`, true);
  S.client.send(S.open, content).catch(() => { /* shown on the message itself, with Retry */ });
  $('text').value = '';
  thread(S.open).draft = '';
  autosize();
  composeHint('');
  S.forceBottom = true;
  render('thread', 'people');
}

const fieldSizing = typeof CSS !== 'undefined' && CSS.supports('field-sizing', 'content');
function autosize() {
  if (fieldSizing) return;  // the stylesheet does it
  const ta = $('text');
  ta.style.height = 'auto';  // CSSOM, which a style-src CSP allows
  if (ta.scrollHeight) ta.style.height = Math.min(ta.scrollHeight + 2, 160) + 'px';
}

$('text').addEventListener('input', () => {
  autosize();
  const text = $('text').value;
  const n = [...text.trim()].length;
  composeHint(n > MAX_LEN - 200 ? `${n} / ${MAX_LEN} characters` : '', n > MAX_LEN);
  if (!S || S.open == null) return;
  if (text.trim()) S.client.typing(S.open);
  else S.client.stopTyping();
});
$('text').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    sendMessage();
  }
});
$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  sendMessage();
});

// ---------- drawing (user text only ever via textContent) ----------
function avatar(id, withDot) {
  const a = el('span', `avatar hue-${id % 6}`, nameOf(id).slice(0, 1));
  if (withDot) {
    const on = S.client.isOnline(id);
    const dot = a.appendChild(el('span', 'dot' + (on ? ' on' : '')));
    dot.setAttribute('role', 'img');
    dot.setAttribute('aria-label', on ? 'online' : 'offline');
    dot.title = on ? 'online' : 'offline';
  }
  return a;
}

function renderPeople() {
  const ids = [...S.users.keys()];
  for (const id of S.client.peers()) if (!S.users.has(id) && id !== S.me.id) ids.push(id);
  const lastOf = (id) => { const list = S.client.conversation(id); return list[list.length - 1]; };
  const connected = S.client.status === 'open';
  const unsent = new Map();  // peer -> its newest pending message
  for (const p of S.client.pending) unsent.set(p.recipient_id, p);
  ids.sort((a, b) => ((lastOf(b) || {}).id || 0) - ((lastOf(a) || {}).id || 0) || nameOf(a).localeCompare(nameOf(b)));
  const items = ids.map((id) => {
    const last = lastOf(id);
    const t = S.threads.get(id);
    const p = unsent.get(id);
    const b = el('button', 'person');
    b.type = 'button';
    b.dataset.id = id;
    if (id === S.open) b.setAttribute('aria-current', 'true');
    b.append(avatar(id, true), el('span', 'name', nameOf(id)), el('span', 'when', last ? shortWhen(last.created_at) : ''));
    let preview, cls = 'preview';
    if (S.typingFrom.has(id)) [preview, cls] = ['typing…', 'preview typing'];
    else if (p && p.status === 'failed') [preview, cls] = ['Not sent: ' + p.content, 'preview unsent'];
    else if (p && !connected) [preview, cls] = ['Unsent: ' + p.content, 'preview unsent'];
    else if (p) preview = 'You: ' + p.content;
    else if (last) preview = (last.sender_id === S.me.id ? 'You: ' : '') + last.content;
    else preview = 'No messages yet';
    b.append(el('span', cls, preview));
    if (t && t.unread) {
      const badge = b.appendChild(el('span', 'badge', String(t.unread)));
      badge.append(el('span', 'visually-hidden', ' unread'));
    }
    b.addEventListener('click', () => openConversation(id));
    const li = el('li');
    li.append(b);
    return li;
  });
  const focused = document.activeElement && document.activeElement.closest('#people .person');
  $('people').replaceChildren(...items);
  if (focused) {
    const again = $('people').querySelector(`.person[data-id="${focused.dataset.id}"]`);
    if (again) again.focus();
  }
}

function renderHead() {
  if (S.open == null) return;
  const on = S.client.isOnline(S.open);
  $('peer-name').textContent = nameOf(S.open);
  $('peer-avatar').replaceWith(Object.assign(avatar(S.open, true), { id: 'peer-avatar' }));
  $('peer-avatar').setAttribute('aria-hidden', 'true');  // the status text says it
  const status = $('peer-status');
  status.textContent = S.client.status !== 'open' ? 'waiting for the connection…' : on ? 'online' : 'offline';
  status.classList.toggle('on', on && S.client.status === 'open');
}

function renderTyping() {
  const show = S.open != null && S.typingFrom.has(S.open);
  $('typing').textContent = show ? `${nameOf(S.open)} is typing…` : '';
}

function renderTitle() {
  let total = 0;
  for (const t of S.threads.values()) total += t.unread;
  document.title = total ? `(${total}) pmhub chat` : 'pmhub chat';
}

function messageNode(m, grouped) {
  const mine = m.sender_id === S.me.id;
  const row = el('div', `msg ${mine ? 'mine' : 'theirs'}${grouped ? ' cont' : ''}`);
  row.dataset.id = m.id;
  row.append(el('span', 'visually-hidden', mine ? 'You:' : `${nameOf(m.sender_id)}:`), el('p', 'text', m.content));
  const meta = row.appendChild(el('div', 'meta'));
  const when = parseTime(m.created_at);
  const time = meta.appendChild(el('time', '', timeOf(when)));
  time.dateTime = m.created_at;
  time.title = isNaN(when) ? '' : when.toLocaleString();
  if (mine) meta.append(el('span', 'ticks'));
  return row;
}

function updateTicks(row, m) {
  const ticks = row.querySelector('.ticks');
  if (!ticks || ticks.dataset.read === String(m.is_read)) return;
  const label = m.is_read ? 'read' : 'sent';
  ticks.dataset.read = String(m.is_read);
  ticks.textContent = m.is_read ? '✓✓' : '✓';
  ticks.classList.toggle('read', m.is_read);
  ticks.setAttribute('role', 'img');
  ticks.setAttribute('aria-label', label);
  ticks.title = label;
}

function pendingNode(p, connected, grouped) {
  const failed = p.status === 'failed';
  const row = el('div', `msg mine ${failed ? 'failed' : 'pending'}${grouped ? ' cont' : ''}`);
  row.dataset.clientId = p.client_id;
  row.append(el('p', 'text', p.content));
  const meta = row.appendChild(el('div', 'meta'));
  if (!failed) {
    meta.append(connected ? 'sending…' : 'waiting for connection…');
    return row;
  }
  meta.append(el('span', '', 'Not sent: ' + p.error));
  const retry = meta.appendChild(el('button', '', 'Retry'));
  retry.type = 'button';
  retry.addEventListener('click', () => S.client.retry(p.client_id).catch(() => {}));
  const discard = meta.appendChild(el('button', '', 'Discard'));
  discard.type = 'button';
  discard.addEventListener('click', () => S.client.discard(p.client_id));
  return row;
}

// Draws the open conversation: day separators, stored messages in id order, then
// pending ones. Elements are kept by key, so the log only announces new ones.
function renderThread() {
  if (S.open == null) return;
  const t = thread(S.open);
  const box = $('messages');
  const stick = S.forceBottom || nearBottom();
  S.forceBottom = false;
  const connected = S.client.status === 'open';
  const entries = [
    ...S.client.conversation(t.peer).map((m) => ({ m, from: m.sender_id, at: parseTime(m.created_at) })),
    ...S.client.pending.filter((p) => p.recipient_id === t.peer)
      .map((p) => ({ p, from: S.me.id, at: new Date(p.created_at) })),
  ];
  const nodes = new Map();
  const keep = (key, make) => nodes.set(key, S.nodes.get(key) || make());
  if (!t.loaded && !entries.length) keep('loading', () => el('p', 'note', 'Loading…'));
  let previous = null;
  for (const e of entries) {
    const day = isNaN(e.at) ? previous && previous.day : dayKey(e.at);
    if (!previous || day !== previous.day) {
      const label = isNaN(e.at) ? '' : dayLabel(e.at);
      keep(`d:${day}:${label}`, () => el('div', 'day', label));
    }
    const grouped = previous && previous.day === day && previous.from === e.from && e.at - previous.at < GROUP_MS;
    if (e.m) {
      const key = `m:${e.m.id}:${grouped ? 1 : 0}`;
      keep(key, () => messageNode(e.m, grouped));
      updateTicks(nodes.get(key), e.m);
    } else {
      keep(`p:${e.p.client_id}:${e.p.status}:${connected}:${grouped ? 1 : 0}:${e.p.error}`,
        () => pendingNode(e.p, connected, grouped));
    }
    previous = { day, from: e.from, at: e.at };
  }
  if (t.loaded && !entries.length) keep('empty', () => el('p', 'note', `No messages with ${nameOf(t.peer)} yet. Say hello!`));
  S.nodes = nodes;
  // Put the wanted elements in order, moving only what is out of place.
  const list = $('list');
  let cursor = list.firstChild;
  for (const node of nodes.values()) {
    if (node === cursor) cursor = cursor.nextSibling;
    else list.insertBefore(node, cursor);
  }
  while (cursor) {
    const next = cursor.nextSibling;
    cursor.remove();
    cursor = next;
  }
  $('older').hidden = !(t.loaded && t.hasMore);
  if (stick) {
    box.scrollTop = box.scrollHeight;
    S.jump = false;
  }
  $('jump').hidden = !S.jump;
}

// ---------- boot ----------
(async () => {
  try {
    return start(await api('api/me'));
  } catch (e) { /* not signed in, or the server is unreachable: show the form */ }
  showLogin('');
})();
