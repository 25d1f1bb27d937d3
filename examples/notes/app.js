// Notes: a local-first app on the app API of a Kubelt node (the kb_* JSON-RPC methods).
//
// - Sign in: the wallet (window.ethereum, EIP-1193) signs the EIP-4361 message that
//   kb_getNonce returns; kb_verifyNonce turns the signature into a token for the `notes`
//   namespace of the wallet's core.
// - Data: each note is one value of that namespace: notes/<id> = {title, body, updated}.
// - Local first: the notes last seen and every edit the node has not taken yet are kept in
//   localStorage. An edit goes into the outbox first and is sent from there (kb_setData), oldest
//   first, until the node takes it; while the node cannot be reached the app keeps working and
//   says how many edits wait.
// - Live: a WebSocket subscription (kb_subscribe) brings every change to the namespace, made
//   here, by another app, or on another device's node.
//
// - Offline start: a service worker (sw.js) keeps a copy of the app's files, so the page also
//   opens while the node is away.
//
// Plain JavaScript, no build step, no dependencies: the node serves this file as is.
'use strict';

const NAMESPACE = 'notes';
const CAPABILITIES = { [NAMESPACE]: ['read', 'write'] };
/** The node's JSON-RPC endpoint: the origin this page was served from. */
const ENDPOINT = new URL('/', location.href);
/** Delays (ms) before reconnecting and resending, growing with each failure in a row. */
const BACKOFF = [250, 500, 1000, 2000, 4000];
/** Typing is sent after this pause (ms); the outbox (and localStorage) has it at once. */
const SEND_DELAY = 400;
/** The errors that mean the token is no good any more: sign in again. */
const TOKEN_ERRORS = new Set([-32034, -32035, -32036, -32037, -32038, -32039]);
/** The id of the kb_subscribe call on each WebSocket. */
const SUBSCRIBE_ID = 1;
/** A note's id: what this app makes (other writers' keys are not shown). */
const NOTE_ID = /^[A-Za-z0-9_-]{1,64}$/;
const MAX_TITLE = 200;
const MAX_BODY = 100000;

/** A JSON-RPC error answered by the node. */
class RpcError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** The node could not be reached (or answered with something that is not JSON-RPC). */
class Unreachable extends Error {}

const app = {
  /** {token, address, expires} while signed in. */
  session: null,
  /** id → note, as the node last told us. */
  remote: new Map(),
  /** Counts the updates of `remote`: a read that was overtaken by one is not applied. */
  remoteVersion: 0,
  /** [{seq, id, note}], oldest first: edits the node has not taken yet. */
  outbox: [],
  nextSeq: 1,
  /** The id of the note in the editor. */
  selected: null,
  socket: null,
  /** Whether the socket's kb_subscribe was answered: changes come in live. */
  live: false,
  /** Failures in a row, for the backoff. */
  failures: 0,
  retryTimer: null,
  sendTimer: null,
  sending: false,
  /** The last refusal of an edit by the node (not an outage), shown in the status. */
  problem: '',
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- local storage

/** localStorage, under names of this app; a full or disabled storage only costs persistence. */
const storage = {
  load(name, fallback) {
    try {
      const text = localStorage.getItem(`kubelt-notes/${name}`);
      return text === null ? fallback : JSON.parse(text);
    } catch {
      return fallback;
    }
  },
  save(name, value) {
    try {
      localStorage.setItem(`kubelt-notes/${name}`, JSON.stringify(value));
    } catch (error) {
      console.warn('notes: cannot save to localStorage', error);
    }
  },
  remove(name) {
    localStorage.removeItem(`kubelt-notes/${name}`);
  },
};

/** Keeps what the node told us and the outbox, per account, for the next visit. */
function saveLocal() {
  if (!app.session) return;
  const account = app.session.address.toLowerCase();
  storage.save(`notes/${account}`, [...app.remote]);
  storage.save(`outbox/${account}`, app.outbox);
}

// ---------------------------------------------------------------- data from the core

/** A note as this app shows it, from any JSON value (other writers may put anything there). */
function asNote(value) {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return null;
  const text = (field, max) => (typeof value[field] === 'string' ? value[field].slice(0, max) : '');
  return { title: text('title', MAX_TITLE), body: text('body', MAX_BODY), updated: text('updated', 40) };
}

/** The notes of a namespace value ({id: note}), as a Map (no key can reach a prototype). */
function asNotes(value) {
  const notes = new Map();
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return notes;
  for (const [id, entry] of Object.entries(value)) {
    const note = asNote(entry);
    if (NOTE_ID.test(id) && note) notes.set(id, note);
  }
  return notes;
}

/** What the person sees: the node's notes with the edits not sent yet on top. */
function currentNotes() {
  const notes = new Map(app.remote);
  for (const edit of app.outbox) notes.set(edit.id, edit.note);
  return notes;
}

function setRemote(value) {
  app.remote = asNotes(value);
  app.remoteVersion += 1;
  saveLocal();
  render();
}

// ---------------------------------------------------------------- JSON-RPC over HTTP

let nextCallId = 1;

/** Calls a method of the node's app API with the session's token. */
async function rpc(method, params) {
  const headers = { 'Content-Type': 'application/json' };
  if (app.session) headers.Authorization = `Bearer ${app.session.token}`;
  const body = JSON.stringify({ jsonrpc: '2.0', id: nextCallId++, method, params });
  let reply;
  try {
    const response = await fetch(ENDPOINT, { method: 'POST', headers, body });
    reply = await response.json();
  } catch (error) {
    throw new Unreachable(`the node cannot be reached (${error.message})`);
  }
  if (reply.error) throw new RpcError(reply.error.code, reply.error.message);
  return reply.result;
}

// ---------------------------------------------------------------- signing in

function hexOfText(text) {
  const bytes = new TextEncoder().encode(text);
  return `0x${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

async function signIn() {
  const wallet = window.ethereum;
  if (!wallet) {
    $('sign-in-error').textContent = 'No wallet in this browser: install one that provides window.ethereum (EIP-1193).';
    return;
  }
  $('sign-in').disabled = true;
  $('sign-in-error').textContent = '';
  try {
    const [address] = await wallet.request({ method: 'eth_requestAccounts' });
    const { nonce, message } = await rpc('kb_getNonce', [address, CAPABILITIES]);
    // personal_sign takes the message as hex of its UTF-8 bytes, then the account (EIP-1474).
    const signature = await wallet.request({ method: 'personal_sign', params: [hexOfText(message), address] });
    const login = await rpc('kb_verifyNonce', [nonce, signature]);
    startSession({ token: login.token, address: login.address, expires: login.expires });
  } catch (error) {
    $('sign-in-error').textContent = error.code === 4001 ? 'The wallet declined to sign.' : `Cannot sign in: ${error.message}`;
  } finally {
    $('sign-in').disabled = false;
  }
}

function startSession(session) {
  app.session = session;
  storage.save('session', session);
  const account = session.address.toLowerCase();
  app.remote = new Map(storage.load(`notes/${account}`, []).filter(([id, note]) => NOTE_ID.test(id) && asNote(note)));
  app.outbox = storage.load(`outbox/${account}`, []).filter((edit) => NOTE_ID.test(edit.id) && asNote(edit.note));
  app.nextSeq = Math.max(0, ...app.outbox.map((edit) => edit.seq)) + 1;
  app.failures = 0;
  render();
  connect();
  sendOutbox();
}

/** Ends the session; the notes and the outbox stay, for when the same wallet signs in again. */
function endSession(reason) {
  app.session = null;
  app.live = false;
  app.selected = null;
  storage.remove('session');
  clearTimeout(app.retryTimer);
  app.retryTimer = null;
  if (app.socket) {
    const socket = app.socket;
    app.socket = null;
    socket.close();
  }
  $('sign-in-error').textContent = reason;
  render();
}

async function signOut() {
  try {
    await rpc('kb_logout', []);
  } catch (error) {
    // The token dies with its expiry anyway; forget it here either way.
    console.warn('notes: kb_logout failed', error);
  }
  endSession('');
}

// ---------------------------------------------------------------- the outbox

/** Puts an edit in the outbox (replacing an older edit of the same note) and sends it soon. */
function queueEdit(id, note) {
  app.outbox = app.outbox.filter((edit) => edit.id !== id);
  app.outbox.push({ seq: app.nextSeq++, id, note });
  saveLocal();
  render();
  clearTimeout(app.sendTimer);
  app.sendTimer = setTimeout(sendOutbox, SEND_DELAY);
}

/** Sends the outbox, oldest first; stops at the first failure and tries again later. */
async function sendOutbox() {
  if (app.sending || !app.session) return;
  app.sending = true;
  render();
  try {
    while (app.session && app.outbox.length > 0) {
      const edit = app.outbox[0];
      await rpc('kb_setData', [NAMESPACE, edit.id, edit.note]);
      app.remote.set(edit.id, edit.note);
      app.remoteVersion += 1;
      // Typing may have replaced it meanwhile: only this edit is done.
      app.outbox = app.outbox.filter((queued) => queued.seq !== edit.seq);
      app.problem = '';
      saveLocal();
      render();
    }
  } catch (error) {
    failed(error);
  } finally {
    app.sending = false;
    render();
  }
}

/** A call failed: sign in again for a bad token, else try again after a while. */
function failed(error) {
  if (error instanceof RpcError && TOKEN_ERRORS.has(error.code)) {
    endSession(`Signed out by the node: ${error.message}`);
    return;
  }
  // A refused edit (a quota, say) stays in the outbox and is tried again: nothing is lost.
  app.problem = error instanceof RpcError ? error.message : '';
  app.failures += 1;
  retrySoon();
  render();
}

function retrySoon() {
  if (app.retryTimer || !app.session) return;
  const delay = BACKOFF[Math.min(app.failures, BACKOFF.length) - 1] ?? BACKOFF[0];
  app.retryTimer = setTimeout(() => {
    app.retryTimer = null;
    connect();
    sendOutbox();
  }, delay);
}

// ---------------------------------------------------------------- live changes

/** Opens the WebSocket and subscribes to the namespace (the token goes in the query: browsers
 * cannot set headers on a WebSocket). */
function connect() {
  if (!app.session || app.socket) return;
  const url = new URL(ENDPOINT);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('access_token', app.session.token);
  const socket = new WebSocket(url);
  app.socket = socket;
  socket.addEventListener('open', () => {
    socket.send(JSON.stringify({ jsonrpc: '2.0', id: SUBSCRIBE_ID, method: 'kb_subscribe', params: [NAMESPACE] }));
  });
  socket.addEventListener('message', (event) => received(socket, event.data));
  socket.addEventListener('close', () => {
    if (app.socket !== socket) return;
    app.socket = null;
    app.live = false;
    app.failures += 1;
    retrySoon();
    render();
  });
}

function received(socket, text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch {
    return;
  }
  if (message.id === SUBSCRIBE_ID) {
    if (message.error) {
      subscriptionEnded(socket, message.error);
      return;
    }
    app.live = true;
    app.failures = 0;
    // Subscribed first, then read: no change falls between the two.
    refresh();
    sendOutbox();
    render();
  } else if (message.method === 'kb_subscription') {
    const params = message.params || {};
    if (params.error) subscriptionEnded(socket, params.error);
    else setRemote(params.result && params.result.value);
  }
}

/** The node ended the subscription: a bad token signs out; anything else (this client fell
 * behind, say) reconnects, and the read after subscribing fills the gap. */
function subscriptionEnded(socket, error) {
  if (TOKEN_ERRORS.has(error.code)) endSession(`Signed out by the node: ${error.message}`);
  else socket.close();
}

/** Reads the whole namespace; a notification or a write that came meanwhile is newer, and the
 * read is then dropped (the notifications keep the page up to date). */
async function refresh() {
  const before = app.remoteVersion;
  try {
    const { value } = await rpc('kb_getData', [NAMESPACE]);
    if (app.remoteVersion === before) setRemote(value);
  } catch (error) {
    failed(error);
  }
}

// ---------------------------------------------------------------- the page

function newNote() {
  const id = `n${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  queueEdit(id, { title: '', body: '', updated: new Date().toISOString() });
  select(id);
  $('note-title').focus();
}

function select(id) {
  app.selected = id;
  render();
}

/** The editor changed: the note as it is now goes to the outbox. */
function edited() {
  if (!app.selected) return;
  const note = { title: $('note-title').value.slice(0, MAX_TITLE), body: $('note-body').value.slice(0, MAX_BODY), updated: new Date().toISOString() };
  queueEdit(app.selected, note);
}

function describeTime(iso) {
  const time = new Date(iso);
  return Number.isNaN(time.getTime()) ? '' : time.toLocaleString();
}

function render() {
  const signedIn = app.session !== null;
  $('sign-in-panel').hidden = signedIn;
  $('notes-panel').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
  $('account').textContent = signedIn ? app.session.address : '';
  renderStatus();
  if (signedIn) {
    const notes = currentNotes();
    renderList(notes);
    renderEditor(notes);
  }
}

function renderStatus() {
  const status = $('status');
  const waiting = app.outbox.length;
  const edits = `${waiting} edit${waiting === 1 ? '' : 's'}`;
  let state;
  let text;
  if (!app.session) [state, text] = ['signed-out', 'signed out'];
  else if (app.problem) [state, text] = ['error', `the node refused an edit: ${app.problem} (${edits} waiting)`];
  else if (!app.live) [state, text] = ['offline', waiting ? `offline · ${edits} waiting for the node` : 'offline'];
  else if (waiting) [state, text] = ['syncing', `sending ${edits}…`];
  else [state, text] = ['online', 'online · all saved'];
  status.dataset.state = state;
  status.dataset.queued = String(waiting);
  status.textContent = text;
}

function renderList(notes) {
  const waiting = new Set(app.outbox.map((edit) => edit.id));
  const sorted = [...notes].sort(([a, x], [b, y]) => y.updated.localeCompare(x.updated) || a.localeCompare(b));
  $('note-list').replaceChildren(
    ...sorted.map(([id, note]) => {
      const item = document.createElement('li');
      item.dataset.id = id;
      item.dataset.queued = String(waiting.has(id));
      item.setAttribute('aria-selected', String(id === app.selected));
      const title = document.createElement('span');
      title.className = 'title';
      title.textContent = note.title.trim() || 'Untitled';
      const when = document.createElement('span');
      when.className = 'when';
      when.textContent = describeTime(note.updated);
      item.append(title, when);
      item.addEventListener('click', () => select(id));
      return item;
    }),
  );
}

function renderEditor(notes) {
  const note = app.selected === null ? undefined : notes.get(app.selected);
  $('editor').hidden = note === undefined;
  $('no-note').hidden = note !== undefined;
  if (note === undefined) return;
  // Only a change from elsewhere differs from what the fields hold: typing is already there.
  if ($('note-title').value !== note.title) $('note-title').value = note.title;
  if ($('note-body').value !== note.body) $('note-body').value = note.body;
  const sent = !app.outbox.some((edit) => edit.id === app.selected);
  $('note-meta').textContent = `${sent ? 'Saved on your node' : 'Not sent yet: kept in this browser until the node takes it'} · ${describeTime(note.updated)}`;
}

function start() {
  // The app's files stay in the browser, so that it opens while the node is away (sw.js).
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('sw.js').catch((error) => console.warn('notes: no offline copy of the app', error));
  }
  $('sign-in').addEventListener('click', signIn);
  $('sign-out').addEventListener('click', signOut);
  $('new-note').addEventListener('click', newNote);
  $('note-title').addEventListener('input', edited);
  $('note-body').addEventListener('input', edited);
  // The browser noticed the network came back: do not wait for the backoff.
  window.addEventListener('online', () => {
    connect();
    sendOutbox();
  });
  const session = storage.load('session', null);
  if (session && typeof session.token === 'string' && typeof session.address === 'string' && session.expires * 1000 > Date.now()) {
    startSession(session);
  } else {
    render();
  }
}

start();
