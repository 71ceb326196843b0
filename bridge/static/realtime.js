// FirstCare Realtime: a reference WebSocket client for dashboards (no framework, no build).
//
//   const client = new RealtimeClient({token: () => jwt, rooms: ['hospital:h1', 'hospital:h1:alerts']});
//   client.addEventListener('event', (e) => show(e.detail));          // an event envelope
//   client.addEventListener('synced', (e) => { if (e.detail.reload) reloadFromRestApi(); });
//   client.addEventListener('state', (e) => indicator(e.detail.state));
//   client.start();
//
// What it does, following the README ("Real time: WebSocket and Server-Sent Events"):
// * trades the JWT for a single-use ticket (POST /realtime/ticket) so the JWT never appears in a
//   URL; falls back to the `bearer.<jwt>` subprotocol next to `firstcare.v1`;
// * subscribes to every room after `welcome`, with `since` = the last event id seen IN THAT ROOM,
//   so a reconnect replays exactly what was missed;
// * drops duplicates client side too (same epoch, offset not above the last one of the room);
// * a `resync` answer means the history no longer reaches back: the `synced` event then says
//   `reload: true`, and the page reloads from the REST API. A `resync` for a room already
//   joined (the server could not record some of its events) does the same at once;
// * `unsubscribed` with `reason: "forbidden"` (a refreshed token no longer allows the room) is
//   reported as `forbidden`, like a refused subscribe;
// * `presence_join` / `presence_leave` (who comes and goes in a room) are emitted as `presence`;
// * reconnects with exponential backoff and jitter for 4000-4099 and network failures; stops for
//   4400-4499 (4401/4410: sign in again, 4403: forbidden) and reports why.

const CLOSE_MESSAGES = {
  4401: 'token_invalid', 4403: 'forbidden', 4405: 'origin_forbidden', 4409: 'too_many_connections',
  4410: 'token_expired', 4413: 'message_too_large', 4429: 'rate_limited',
};
const RETRY_LATER = new Set([4409, 4429]); // not our fault for good: retry, but slowly
const SILENCE_MS = 65_000; // the server pings every FC_WS_PING_SECONDS (20 s by default)
const MAX_BACKOFF_MS = 30_000;
const DEDUP_ROOMS_LIMIT = 1000;

export function parseEventId(id) {
  const i = typeof id === 'string' ? id.lastIndexOf(':') : -1;
  if (i <= 0) return null;
  const offset = Number(id.slice(i + 1));
  return Number.isSafeInteger(offset) ? {epoch: id.slice(0, i), offset} : null;
}

export class RealtimeClient extends EventTarget {
  /**
   * @param {object} options
   * @param {() => string} options.token   returns the current JWT
   * @param {string[]} options.rooms       rooms to keep subscribed
   * @param {string} [options.base]        http(s) origin of the bridge (default: this page's)
   * @param {(attempt: number) => number} [options.backoff]  delay before reconnect attempt n (ms)
   */
  constructor({token, rooms, base = location.origin, backoff}) {
    super();
    this.token = token;
    this.rooms = [...rooms];
    this.base = base.replace(/\/$/, '');
    this.backoff = backoff || ((attempt) => {
      const ceiling = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** attempt);
      return ceiling * (1 + Math.random() * 0.5); // >= 1 s, jittered so a ward does not stampede
    });
    this.lastId = new Map();   // room -> last event id seen (the `since` of the next subscribe)
    this.state = 'idle';
    this.ws = null;
    this.attempt = 0;
    this.stopped = true;
    this.timer = null;
    this.holdUntil = 0;
    this.pending = new Map();  // room -> 'since' sent, until its subscribed/resync/error answer
    this.answers = new Map();  // room -> 'subscribed' | 'resync' | 'forbidden'
    this.lastMessageAt = 0;
    this.watchdog = null;
    this.onOnline = () => { if (!this.stopped && !this.ws) this.reconnectNow(); };
  }

  start() {
    this.stopped = false;
    addEventListener('online', this.onOnline);
    this.watchdog = setInterval(() => this.checkSilence(), 5000);
    this.connect();
  }

  stop(state = 'idle', detail = {}) {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    removeEventListener('online', this.onOnline);
    const ws = this.ws;
    this.ws = null;
    if (ws) { ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null; ws.close(1000, 'client stopped'); }
    this.setState(state, detail);
  }

  /** Close the socket abruptly (as a network blip would) and hold reconnecting for `holdMs`. */
  drop(holdMs = 0, code = 4000) {
    this.holdUntil = Date.now() + holdMs;
    if (this.ws) this.ws.close(code, 'dropped by the page');
  }

  reconnectNow() {
    clearTimeout(this.timer);
    this.holdUntil = 0;
    this.connect();
  }

  setState(state, detail = {}) {
    this.state = state;
    this.emit('state', {state, ...detail});
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, {detail}));
  }

  async credentials() {
    // A ticket keeps the long-lived JWT out of URLs (and access logs); single use, 30 s.
    const response = await fetch(`${this.base}/realtime/ticket`, {
      method: 'POST', headers: {Authorization: `Bearer ${this.token()}`},
    });
    if (response.status === 401) {
      const body = await response.json().catch(() => ({}));
      const error = new Error(body.detail || 'token rejected');
      error.code = body.error === 'token_expired' ? 4410 : 4401;
      throw error;
    }
    if (response.ok) {
      const {ticket} = await response.json();
      return {query: `?ticket=${encodeURIComponent(ticket)}`, protocols: ['firstcare.v1']};
    }
    // tickets unavailable (e.g. the hub is degraded): the token as a subprotocol still works
    return {query: '', protocols: ['firstcare.v1', `bearer.${this.token()}`]};
  }

  async connect() {
    if (this.stopped) return;
    this.setState(this.everConnected ? 'reconnecting' : 'connecting', {attempt: this.attempt});
    let creds;
    try {
      creds = await this.credentials();
    } catch (error) {
      if (this.stopped) return;
      if (error.code) { this.stop('signed-out', {code: error.code, reason: error.message}); return; }
      this.scheduleReconnect(); // network down, server restarting
      return;
    }
    if (this.stopped) return;
    const url = `${this.base.replace(/^http/, 'ws')}/realtime/ws${creds.query}`;
    const ws = new WebSocket(url, creds.protocols);
    this.ws = ws;
    this.pending.clear();
    this.answers.clear();
    ws.onopen = () => { this.lastMessageAt = Date.now(); };
    ws.onmessage = (message) => this.receive(message.data);
    ws.onclose = (event) => this.closed(ws, event);
  }

  checkSilence() {
    // a half-open connection never reports itself: no message (not even the server's ping)
    // for this long means it is gone
    if (this.ws && this.ws.readyState === WebSocket.OPEN && Date.now() - this.lastMessageAt > SILENCE_MS) {
      this.ws.close(4000, 'no message from the server');
    }
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  receive(text) {
    if (this.stopped) return;
    this.lastMessageAt = Date.now();
    let message;
    try { message = JSON.parse(text); } catch { return; }
    switch (message.type) {
      case 'welcome':
        this.everConnected = true;
        this.emit('welcome', message);
        for (const room of this.rooms) {
          const since = this.lastId.get(room);
          this.pending.set(room, since || null);
          this.send(since ? {type: 'subscribe', room, since} : {type: 'subscribe', room});
        }
        return;
      case 'subscribed':
        this.answered(message.room, 'subscribed', message);
        return;
      case 'resync':
        this.lastId.delete(message.room); // its history is gone: start the room afresh
        this.emit('resync', message);
        if (this.pending.has(message.room)) {
          this.answered(message.room, 'resync', message);
        } else { // a gap while joined: reload now
          this.answers.set(message.room, {answer: 'resync', since: null});
          this.emit('synced', {reload: true, rooms: [message.room], forbidden: [], live: true});
        }
        return;
      case 'unsubscribed':
        if (message.reason === 'forbidden') {
          this.rooms = this.rooms.filter((room) => room !== message.room);
          this.emit('forbidden', message);
        }
        return;
      case 'presence_join': case 'presence_leave':
        this.emit('presence', message);
        return;
      case 'error':
        if (message.code === 'forbidden' && this.pending.has(message.room)) {
          this.emit('forbidden', message);
          this.answered(message.room, 'forbidden', message);
        } else {
          this.emit('server-error', message);
        }
        return;
      case 'ping': case 'pong': case 'authenticated':
        return;
      default:
        if (typeof message.id === 'string' && typeof message.room === 'string') this.deliver(message);
    }
  }

  answered(room, answer, message) {
    const since = this.pending.get(room);
    if (since === undefined || this.stopped) return;
    this.pending.delete(room);
    this.answers.set(room, {answer, since});
    this.emit('subscribed', {room, answer, since, replayed: message.replayed || 0});
    if (this.pending.size === 0) {
      const answers = [...this.answers];
      // a room subscribed without a cursor (first load, or a quiet room that never had an
      // event) or answered with resync may have missed something: reload it from REST
      const fresh = answers.filter(([, a]) => a.answer === 'resync' || (a.answer === 'subscribed' && !a.since));
      const forbidden = answers.filter(([, a]) => a.answer === 'forbidden').map(([r]) => r);
      this.attempt = 0;
      this.setState('connected');
      this.emit('synced', {reload: fresh.length > 0, rooms: fresh.map(([r]) => r), forbidden});
    }
  }

  deliver(envelope) {
    const id = parseEventId(envelope.id);
    const last = parseEventId(this.lastId.get(envelope.room));
    this.emit('raw', envelope);
    if (id && last && id.epoch === last.epoch && id.offset <= last.offset) return; // duplicate
    if (id) {
      this.lastId.set(envelope.room, envelope.id);
      if (this.lastId.size > DEDUP_ROOMS_LIMIT) this.lastId.delete(this.lastId.keys().next().value);
    }
    this.emit('event', envelope);
  }

  closed(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    if (this.stopped) return;
    const code = event.code;
    if (code === 4401 || code === 4410) {
      this.stop('signed-out', {code, reason: event.reason || CLOSE_MESSAGES[code]});
    } else if (code === 4403 || code === 4405 || code === 4413) {
      this.stop('offline', {code, reason: event.reason || CLOSE_MESSAGES[code]});
    } else {
      if (RETRY_LATER.has(code)) this.attempt = Math.max(this.attempt, 5);
      this.setState('reconnecting', {code, reason: event.reason || CLOSE_MESSAGES[code] || ''});
      this.scheduleReconnect();
    }
  }

  scheduleReconnect() {
    clearTimeout(this.timer);
    const delay = Math.max(this.backoff(this.attempt), this.holdUntil - Date.now());
    this.attempt += 1;
    this.setState('reconnecting', {attempt: this.attempt, inMs: Math.round(delay)});
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
