// FirstCare Realtime ward dashboard: plain JavaScript, no framework, no build, no external resources.
//
// Data flow: RealtimeClient (./realtime.js) delivers event envelopes of the rooms
// `hospital:{hid}` and `hospital:{hid}:alerts`; they update a small model (patients, devices,
// alarms); model changes mark tiles dirty, and one requestAnimationFrame callback redraws only
// the dirty parts. What the WebSocket cannot give (the state before we connected, or after a
// resync) comes from the public REST API. Test hooks live on `window.__fc`.

import {RealtimeClient} from './realtime.js';

// --- vocabulary -------------------------------------------------------------------------------

const METRICS = {
  heart_rate: {label: 'HR', unit: '/min', digits: 0, span: 20, name: 'Heart rate'},
  spo2: {label: 'SpO₂', unit: '%', digits: 0, span: 6, name: 'Oxygen saturation', max: 100},
  systolic_bp: {label: 'BP', unit: 'mm[Hg]', digits: 0, span: 30, name: 'Systolic blood pressure'},
  diastolic_bp: {label: 'BP', unit: 'mm[Hg]', digits: 0, span: 30, name: 'Diastolic blood pressure'},
  respiratory_rate: {label: 'RR', unit: '/min', digits: 0, span: 8, name: 'Respiratory rate'},
  temperature: {label: 'Temp', unit: 'Cel', digits: 1, span: 1, name: 'Temperature'},
  glucose: {label: 'Glu', unit: 'mg/dL', digits: 0, span: 40, name: 'Glucose'},
  weight: {label: 'Wt', unit: 'kg', digits: 1, span: 2, name: 'Weight'},
};
// tile rows, in the order of a bedside monitor; blood pressure is one row "BP 120/80"
const ROWS = [
  {key: 'heart_rate', metrics: ['heart_rate']},
  {key: 'spo2', metrics: ['spo2']},
  {key: 'bp', metrics: ['systolic_bp', 'diastolic_bp']},
  {key: 'respiratory_rate', metrics: ['respiratory_rate']},
  {key: 'temperature', metrics: ['temperature']},
  {key: 'glucose', metrics: ['glucose']},
  {key: 'weight', metrics: ['weight']},
];
const ROW_OF = Object.fromEntries(ROWS.flatMap((row) => row.metrics.map((m) => [m, row])));
const UNIT_LABELS = {'/min': '/min', '%': '%', 'mm[Hg]': 'mmHg', Cel: '°C', '[degF]': '°F', 'mg/dL': 'mg/dL', kg: 'kg'};
const DEVICE_LABELS = {monitor: 'MON', oximeter: 'OX', bp: 'BP', thermometer: 'THERM', glucometer: 'GLU', scale: 'SCALE'};
// streaming devices: one of these offline leaves the patient unwatched (spot-check devices go offline between uses)
const CONTINUOUS = new Set(['monitor', 'oximeter']);
const PRIORITY_RANK = {high: 3, medium: 2, low: 1};
const STREAMED = new Set(['heart_rate', 'spo2', 'respiratory_rate']);

const SPARK_MS = 5 * 60_000;       // sparklines show the last five minutes
const STALE_MS = 2 * 60_000;       // a streamed value older than this is shown dimmed
const SWEEP_MS = 5_000;            // sparklines scroll and values go stale even without data
const HYDRATE_CONCURRENCY = 4;
const RECORD_LIMIT = 50_000;       // window.__fc.received / raw keep at most this many entries
const FRAME_BUDGET_MS = 8;         // tile redraws per animation frame stop after this long
const WINDOWS = {'5m': 5 * 60_000, '1h': 3_600_000, '24h': 86_400_000};

// --- small helpers ------------------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function h(tag, attrs = {}, ...children) {
  const el = tag.startsWith('svg:')
    ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.setAttribute('class', value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function toggle(el, name, on) {
  if (el.classList.contains(name) !== Boolean(on)) el.classList.toggle(name, Boolean(on));
}

function setAttr(el, name, value) {
  if (value === null || value === undefined) {
    if (el.hasAttribute(name)) el.removeAttribute(name);
  } else if (el.getAttribute(name) !== String(value)) {
    el.setAttribute(name, value);
  }
}

function formatValue(metric, value) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  return Number(value).toFixed((METRICS[metric] || {digits: String(metric).startsWith('news2') ? 0 : 1}).digits);
}

function unitLabel(unit) {
  return UNIT_LABELS[unit] ?? unit ?? '';
}

// one formatter each: toLocaleTimeString() builds a new one per call, which is slow at 100 events/s
const TIME = new Intl.DateTimeFormat([], {hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23'});
const HOUR_MINUTE = new Intl.DateTimeFormat([], {hour: '2-digit', minute: '2-digit', hourCycle: 'h23'});

function clock(ms) {
  return ms ? TIME.format(ms) : '';
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function decodeJwt(token) {
  const part = String(token).split('.')[1];
  if (!part) throw new Error('not a JWT (expected three dot-separated parts)');
  const base64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** A y range for `values` at least `span` wide, kept under the metric's ceiling (SpO₂ 100 %). */
function valueRange(metric, values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  const {span, max} = METRICS[metric] || {span: 1};
  if (hi - lo < span) { const mid = (hi + lo) / 2; lo = mid - span / 2; hi = mid + span / 2; }
  if (max !== undefined && hi > max) { lo -= hi - max; hi = max; }
  return [lo, hi];
}

function lowerBound(points, t) {
  let lo = 0;
  let hi = points.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < t) lo = mid + 1; else hi = mid;
  }
  return lo;
}

function insertPoint(points, t, v) {
  if (!points.length || points[points.length - 1][0] <= t) points.push([t, v]);
  else points.splice(lowerBound(points, t), 0, [t, v]);
}

function record(list, item) {
  list.push(item);
  if (list.length > RECORD_LIMIT * 1.1) list.splice(0, list.length - RECORD_LIMIT); // trimmed in batches
}

// --- session: token from #token=..., a pasted token, or sessionStorage -----------------------

const session = {token: null, claims: null, hospital: null, patients: [], rooms: []};

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get('token');
  if (token) sessionStorage.setItem('fc.token', token);
  const hospital = params.get('hospital');
  if (hospital) sessionStorage.setItem('fc.hospital', hospital);
  if (token) {
    // keep the JWT out of the address bar, the history and anything copied from it
    params.delete('token');
    const rest = params.toString();
    history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
  }
}

function signIn() {
  const token = sessionStorage.getItem('fc.token');
  if (!token) return {error: null};
  let claims;
  try {
    claims = decodeJwt(token);
  } catch (error) {
    sessionStorage.removeItem('fc.token');
    return {error: `That is not a token: ${error.message}.`};
  }
  if (typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now()) {
    sessionStorage.removeItem('fc.token');
    return {error: 'That token has expired: sign in again.'};
  }
  session.token = token;
  session.claims = claims;
  const hospitals = Array.isArray(claims.hospitals) ? claims.hospitals : [];
  session.patients = claims.role === 'patient' && Array.isArray(claims.patients) ? [...claims.patients].sort() : [];
  session.hospital = session.patients.length ? null : sessionStorage.getItem('fc.hospital') || hospitals[0] || 'h1';
  session.rooms = session.patients.length
    ? session.patients.map((pid) => `patient:${pid}`)
    : [`hospital:${session.hospital}`, `hospital:${session.hospital}:alerts`];
  return {ok: true};
}

function signOut(message) {
  sessionStorage.removeItem('fc.token');
  stopWard();
  session.token = session.claims = null;
  showSignIn(message);
}

// --- REST ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.detail || body.error || `HTTP ${status}`);
    this.status = status;
    this.code = body.error;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: {Authorization: `Bearer ${session.token}`, ...(options.body ? {'Content-Type': 'application/json'} : {}),
      ...(options.headers || {})},
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    signOut(`Your session has ended (${body.error || 'token rejected'}): sign in again.`);
    throw new ApiError(401, body);
  }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

async function fetchPages(path, maxPages = 20) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < maxPages; page += 1) {
    const sep = path.includes('?') ? '&' : '?';
    const body = await api(cursor ? `${path}${sep}cursor=${encodeURIComponent(cursor)}` : path);
    items.push(...body.items);
    cursor = body.next;
    if (!cursor) return {items, complete: true};
  }
  return {items, complete: false};
}

// --- model -----------------------------------------------------------------------------------

const S = {
  patients: new Map(),          // pid -> patient
  devices: new Map(),           // "type:id" -> device record
  deviceToPatient: new Map(),   // "type:id" -> pid (bindings, or learned from readings)
  alarms: new Map(),            // alert id -> alert (as in the API / events)
  alarmsByPatient: new Map(),   // pid -> [alert], rebuilt when alarms change
  loading: false,
  buffer: [],
  loadGen: 0,
  client: null,
  hydrateQueue: [],
  hydrating: 0,
  generation: 0,
};

const dirty = {tiles: new Set(), alarms: false, summary: false, detail: false, frame: 0};

function schedule() {
  if (!dirty.frame) dirty.frame = requestAnimationFrame(flush);
}

function touch(pid) {
  if (pid) dirty.tiles.add(pid);
  if (detail.pid === pid) dirty.detail = true;
  schedule();
}

function devKey(type, id) {
  return `${type}:${id}`;
}

function ensurePatient(pid) {
  let p = S.patients.get(pid);
  if (!p) {
    p = {id: pid, latest: new Map(), series: new Map(), seen: new Map(), devices: new Set(), hydrated: false, el: null};
    S.patients.set(pid, p);
    dirty.summary = true;
    hydrateLater(p);
    touch(pid);
  }
  return p;
}

function linkDevice(pid, type, id) {
  const key = devKey(type, id);
  const p = ensurePatient(pid);
  if (!p.devices.has(key)) {
    p.devices.add(key);
    touch(pid);
  }
  if (S.deviceToPatient.get(key) !== pid) {
    const before = S.deviceToPatient.get(key);
    if (before && S.patients.has(before) && !S.devices.get(key)?.patient_id) {
      S.patients.get(before).devices.delete(key);
      touch(before);
    }
    S.deviceToPatient.set(key, pid);
    dirty.alarms = true; // a technical alarm of this device now belongs to this tile
    dirty.summary = true;
  }
}

/** One reading (from an event or the REST API) into a patient's latest values and series. */
function addReading(p, reading, units) {
  const t = Date.parse(reading.ts);
  const key = `${reading.device_type}/${reading.device_id}:${reading.seq}`;
  if (p.seen.has(key)) return false;
  p.seen.set(key, t);
  for (const [metric, value] of Object.entries(reading.metrics || {})) {
    const current = p.latest.get(metric);
    if (!current || t >= current.t) {
      p.latest.set(metric, {v: value, t, unit: units?.[metric] || METRICS[metric]?.unit || '',
        device: devKey(reading.device_type, reading.device_id)});
    }
    if (Date.now() - t <= SPARK_MS + 10_000) {
      if (!p.series.has(metric)) p.series.set(metric, []);
      insertPoint(p.series.get(metric), t, value);
    }
  }
  return true;
}

function prune(p, now) {
  const cutoff = now - SPARK_MS - 10_000;
  for (const points of p.series.values()) {
    const i = lowerBound(points, cutoff);
    if (i > 0) points.splice(0, i);
  }
  if (p.seen.size > 2000) {
    for (const [key, t] of p.seen) if (t < cutoff) p.seen.delete(key);
  }
}

function upsertDevice(device) {
  const key = devKey(device.device_type, device.device_id);
  S.devices.set(key, device);
  if (device.patient_id) linkDevice(device.patient_id, device.device_type, device.device_id);
  const pid = S.deviceToPatient.get(key);
  if (pid) touch(pid);
  dirty.summary = true;
  schedule();
}

function alarmPatient(alert) {
  return alert.patient_id || (alert.device_type ? S.deviceToPatient.get(devKey(alert.device_type, alert.device_id)) : null);
}

function upsertAlarm(alert) {
  const known = S.alarms.get(alert.id);
  if (known && known.state === 'resolved') return; // final: a late or replayed event cannot revive it
  if (known && alert.state !== 'resolved' && Date.parse(alert.updated_at) < Date.parse(known.updated_at)) return;
  S.alarms.set(alert.id, {...known, ...alert, fadeAt: alert.state === 'resolved' ? Date.now() : undefined});
  if (alert.patient_id) ensurePatient(alert.patient_id);
  if (alert.state === 'resolved') setTimeout(() => { S.alarms.delete(alert.id); dirty.alarms = true; schedule(); }, 1800);
  dirty.alarms = true;
  schedule();
}

function applyEvent(envelope) {
  const data = envelope.data || {};
  switch (envelope.type) {
    case 'vitals_update': {
      if (!data.patient_id) return;
      const p = ensurePatient(data.patient_id);
      if (data.device_type && data.device_id) linkDevice(data.patient_id, data.device_type, data.device_id);
      if (addReading(p, data, data.units)) {
        touch(p.id);
        if (detail.pid === p.id) detailAdd(data);
      }
      return;
    }
    case 'alert_raised': case 'alert_acknowledged': case 'alert_escalated': case 'alert_resolved':
      upsertAlarm(data);
      return;
    case 'device_status':
      upsertDevice(data);
      return;
    case 'news2_update':
      if (data.patient_id) setNews2(data.patient_id, data);
      return;
    case 'patient_status':
      if (data.patient_id) { ensurePatient(data.patient_id).status = data; touch(data.patient_id); }
      return;
    case 'hospital_alert': case 'emergency': case 'capacity_update':
      toast(`${envelope.event}: ${data.message || JSON.stringify(data)}`, envelope.type === 'emergency' ? 'high' : 'info');
      return;
    default:
  }
}

function onEvent(envelope) {
  record(fc.received, {room: envelope.room, id: envelope.id, type: envelope.type,
    device: envelope.data?.device_id, seq: envelope.data?.seq, patient: envelope.data?.patient_id});
  if (S.loading) S.buffer.push(envelope); // applied on top of the REST snapshot once it is in
  else applyEvent(envelope);
}

// --- loading from the REST API -----------------------------------------------------------------

function hydrateLater(p) {
  p.hydrated = false;
  S.hydrateQueue.push(p.id);
  pumpHydrate();
}

function pumpHydrate() {
  const generation = S.generation;
  while (S.hydrating < HYDRATE_CONCURRENCY && S.hydrateQueue.length) {
    const pid = S.hydrateQueue.shift();
    const p = S.patients.get(pid);
    if (!p || p.hydrated) continue;
    S.hydrating += 1;
    hydrate(p, generation).catch(() => {}).finally(() => {
      if (generation !== S.generation) return;
      S.hydrating -= 1;
      pumpHydrate();
    });
  }
}

/** Latest values (covers spot checks older than the sparkline) and the last minutes of readings. */
async function hydrate(p, generation) {
  const pid = encodeURIComponent(p.id);
  const latest = await api(`/api/patients/${pid}/vitals/latest`);
  if (generation !== S.generation) return;
  for (const [metric, item] of Object.entries(latest.metrics || {})) {
    const t = Date.parse(item.ts);
    const current = p.latest.get(metric);
    if (!current || t > current.t) {
      p.latest.set(metric, {v: item.value, t, unit: METRICS[metric]?.unit || '', device: devKey(item.device_type, item.device_id)});
    }
    if (item.device_type && item.device_id && !S.devices.get(devKey(item.device_type, item.device_id))?.patient_id) {
      linkDevice(p.id, item.device_type, item.device_id);
    }
  }
  touch(p.id);
  const news2 = await api(`/api/patients/${pid}/news2?limit=1`);
  if (generation !== S.generation) return;
  if (news2.current) setNews2(p.id, news2.current);
  const since = new Date(Date.now() - SPARK_MS).toISOString();
  const readings = await api(`/api/patients/${pid}/readings?since=${since}&limit=2000`);
  if (generation !== S.generation) return;
  for (const reading of readings.items) addReading(p, reading, null);
  p.hydrated = true;
  touch(p.id);
}

/** The snapshot: devices, active alarms, then every known patient again. Events that arrive
 *  meanwhile are buffered and applied on top, so nothing between snapshot and stream is lost. */
async function reload(reason) {
  const generation = S.generation;
  const load = ++S.loadGen;
  S.loading = true;
  fc.reloads += 1;
  try {
    let devices = [];
    let alerts = [];
    if (session.hospital) {
      const hid = encodeURIComponent(session.hospital);
      [devices, alerts] = await Promise.all([
        fetchPages(`/api/devices?hospital_id=${hid}&limit=1000`).then((r) => r.items),
        fetchPages(`/api/alerts?hospital_id=${hid}&state=active&limit=500`).then((r) => r.items),
      ]);
    } else {
      for (const pid of session.patients) {
        alerts.push(...(await fetchPages(`/api/alerts?patient_id=${encodeURIComponent(pid)}&state=active`)).items);
      }
    }
    if (generation !== S.generation || load !== S.loadGen) return;
    for (const device of devices) upsertDevice(device);
    const active = new Set(alerts.map((a) => a.id));
    for (const [id, alert] of S.alarms) {
      if (!active.has(id) && alert.state !== 'resolved') upsertAlarm({...alert, state: 'resolved'});
    }
    for (const alert of alerts) {
      const known = S.alarms.get(alert.id);
      if (!known || known.state !== 'resolved') S.alarms.set(alert.id, {...known, ...alert});
      if (alert.patient_id) ensurePatient(alert.patient_id);
    }
    dirty.alarms = true;
    for (const p of S.patients.values()) if (p.hydrated || reason === 'resync') hydrateLater(p);
    hideError('load');
  } catch (error) {
    if (error.status !== 401) showError(`Could not load the ward from the REST API: ${error.message}`, 'load');
  } finally {
    if (generation === S.generation && load === S.loadGen) {
      S.loading = false;
      const buffered = S.buffer;
      S.buffer = [];
      for (const envelope of buffered) applyEvent(envelope);
      schedule();
    }
  }
}

// --- the realtime connection ---------------------------------------------------------------------

function startWard() {
  S.generation += 1;
  const client = new RealtimeClient({token: () => session.token, rooms: session.rooms});
  S.client = client;
  fc.client = client;
  S.loading = true; // until the first snapshot: everything the stream brings is buffered
  client.addEventListener('state', (e) => connectionState(e.detail));
  client.addEventListener('raw', (e) => record(fc.raw, {room: e.detail.room, id: e.detail.id, type: e.detail.type,
    device: e.detail.data?.device_id, seq: e.detail.data?.seq}));
  client.addEventListener('event', (e) => onEvent(e.detail));
  client.addEventListener('subscribed', (e) => record(fc.subscribed, e.detail));
  client.addEventListener('resync', () => { fc.resyncs += 1; });
  client.addEventListener('forbidden', (e) => forbidden(e.detail.room));
  client.addEventListener('synced', (e) => {
    if (e.detail.forbidden.length) return;
    if (e.detail.reload) reload(e.detail.rooms.some((r) => client.answers.get(r)?.answer === 'resync') ? 'resync' : 'load');
  });
  client.addEventListener('server-error', (e) => {
    if (e.detail.code !== 'rate_limited') toast(`server: ${e.detail.message || e.detail.code}`, 'info');
  });
  for (const pid of session.patients) ensurePatient(pid);
  client.start();
  if (session.claims.role === 'admin' || session.claims.role === 'service') discoverHospitals();
}

function stopWard() {
  S.generation += 1;
  if (S.client) S.client.stop();
  S.client = null;
  S.patients.clear();
  S.devices.clear();
  S.deviceToPatient.clear();
  S.alarms.clear();
  S.alarmsByPatient.clear();
  S.hydrateQueue = [];
  S.hydrating = 0;
  S.buffer = [];
  S.loading = false;
  closeDetail();
  $('#ward').replaceChildren();
  $('#alarm-list').replaceChildren();
  dirty.tiles.clear();
  dirty.alarms = dirty.summary = true;
  schedule();
}

function forbidden(room) {
  const what = session.hospital ? `hospital ${session.hospital}` : `room ${room}`;
  stopWard();
  connectionState({state: 'offline'});
  showError(`You are not allowed to view ${what} (or it does not exist). Choose another hospital or sign in with another token.`, 'access');
}

function connectionState({state, code, reason, inMs}) {
  const el = $('#connection');
  const shown = state === 'signed-out' ? 'offline' : state;
  el.dataset.state = shown;
  setText($('#connection-text'), shown);
  el.title = [code ? `close code ${code}` : '', reason || '', inMs ? `next attempt in ${(inMs / 1000).toFixed(1)} s` : '']
    .filter(Boolean).join(' · ') || shown;
  if (state === 'signed-out') {
    signOut(`Your session has ended (${reason || 'token rejected'}, close code ${code}): sign in again.`);
  } else if (state === 'offline' && code) {
    if (code === 4403) forbidden(session.rooms[0]);
    else showError(`The server closed the live connection: ${reason} (code ${code}). Reload the page to try again.`, 'conn');
  } else if (state === 'connected') {
    hideError('conn');
  }
}

async function discoverHospitals() {
  try {
    const {items} = await fetchPages('/api/devices?limit=5000', 1);
    const ids = new Set(items.map((d) => d.hospital_id).filter(Boolean));
    fillHospitals([...ids]);
  } catch { /* the hospital box still takes typed ids */ }
}

// --- acknowledge ---------------------------------------------------------------------------------

async function acknowledge(id, button) {
  button.disabled = true;
  button.textContent = 'Acknowledging…';
  try {
    upsertAlarm(await api(`/api/alerts/${encodeURIComponent(id)}/ack`, {method: 'POST', body: '{}'}));
  } catch (error) {
    if (error.status === 409) {
      try { upsertAlarm(await api(`/api/alerts/${encodeURIComponent(id)}`)); } catch { /* shown below */ }
      toast(`Alarm already ${error.code === 'alert_not_active' ? 'resolved' : 'acknowledged'}.`, 'info');
    } else if (error.status !== 401) {
      toast(`Could not acknowledge: ${error.message}`, 'high');
    }
  } finally {
    dirty.alarms = true;
    schedule();
  }
}

// --- rendering (one animation frame at a time) ---------------------------------------------------

function flush() {
  dirty.frame = 0;
  const began = performance.now();
  try {
    render(Date.now());
  } finally {
    const ms = performance.now() - began;
    const stats = fc.frames;
    stats.count += 1;
    stats.totalMs += ms;
    stats.maxMs = Math.max(stats.maxMs, ms);
  }
}

function render(now) {
  if (dirty.alarms) {
    dirty.alarms = false;
    rebuildAlarmIndex();
    renderAlarms(now);
    dirty.summary = true;
  }
  // tiles within a frame budget; whatever is left stays dirty for the next frame, so a burst
  // (the first snapshot, a periodic sweep) never blocks the page for long
  const began = performance.now();
  for (const pid of dirty.tiles) {
    dirty.tiles.delete(pid);
    const p = S.patients.get(pid);
    if (p) renderTile(p, now);
    if (performance.now() - began > FRAME_BUDGET_MS) break;
  }
  if (dirty.tiles.size) schedule();
  if (dirty.summary) {
    dirty.summary = false;
    renderSummary();
  }
  if (dirty.detail) {
    dirty.detail = false;
    renderDetail(now);
  }
}

function rebuildAlarmIndex() {
  const before = S.alarmsByPatient;
  const after = new Map();
  for (const alert of S.alarms.values()) {
    const pid = alarmPatient(alert);
    if (!pid || alert.state === 'resolved') continue;
    if (!after.has(pid)) after.set(pid, []);
    after.get(pid).push(alert);
  }
  for (const pid of new Set([...before.keys(), ...after.keys()])) {
    const a = (before.get(pid) || []).map((x) => `${x.id}/${x.state}`).join();
    const b = (after.get(pid) || []).map((x) => `${x.id}/${x.state}`).join();
    if (a !== b) dirty.tiles.add(pid);
  }
  S.alarmsByPatient = after;
}

function highest(alerts) {
  let best = null;
  for (const a of alerts) if (!best || PRIORITY_RANK[a.priority] > PRIORITY_RANK[best.priority]) best = a;
  return best;
}

function buildTile(p) {
  const el = h('article', {class: 'tile', 'data-testid': `tile-${p.id}`, 'data-patient': p.id, tabindex: '0',
    role: 'button', 'aria-label': `Patient ${p.id}: open details`},
  h('header', {class: 'tile-head'},
    h('span', {class: 'pid'}, p.id),
    h('span', {class: 'chip', hidden: true}),
    h('span', {class: 'news2', 'data-testid': `news2-${p.id}`, hidden: true}),
    h('span', {class: 'devices'})),
  h('div', {class: 'rows'}),
  h('p', {class: 'tile-offline', 'data-testid': `offline-${p.id}`, hidden: true}),
  h('footer', {class: 'tile-alarm', hidden: true}));
  p.el = el;
  p.rows = new Map();
  // keep the ward sorted by patient id: insert before the first tile that sorts after this one
  const ward = $('#ward');
  const next = [...ward.children].find((tile) => tile.dataset.patient > p.id);
  ward.insertBefore(el, next || null);
  return el;
}

function buildRow(p, row) {
  const values = row.metrics.map((m) => h('span', {class: 'v', 'data-testid': `value-${p.id}-${m}`}, '–'));
  const spark = h('svg:svg', {class: 'spark', viewBox: `0 0 ${SPARK_WIDTH} 24`, preserveAspectRatio: 'none', 'aria-hidden': 'true'},
    row.metrics.map((m) => h('svg:polyline', {class: `line m-${m}`, points: ''})));
  const el = h('div', {class: `row r-${row.key}`, 'data-row': row.key},
    h('span', {class: 'label'}, METRICS[row.metrics[0]].label),
    h('span', {class: 'value'}, row.metrics.length === 2 ? [values[0], '/', values[1]] : values[0]),
    h('span', {class: 'unit'}),
    spark);
  const entry = {el, values, unit: el.querySelector('.unit'), lines: [...spark.querySelectorAll('polyline')], row};
  p.rows.set(row.key, entry);
  const container = $('.rows', p.el);
  const order = ROWS.map((r) => r.key);
  const next = [...container.children].find((child) => order.indexOf(child.dataset.row) > order.indexOf(row.key));
  container.insertBefore(el, next || null);
  return entry;
}

const SPARK_WIDTH = 150; // viewBox units: at most one point per unit, about one per pixel on screen

function sparkPoints(points, now, lo, hi) {
  const start = now - SPARK_MS;
  const out = [];
  let lastX = -1;
  for (let i = lowerBound(points, start); i < points.length; i += 1) {
    const [t, v] = points[i];
    const x = Math.round(((t - start) / SPARK_MS) * SPARK_WIDTH);
    const y = Math.round((22 - ((v - lo) / (hi - lo)) * 20) * 10) / 10;
    if (x === lastX && i < points.length - 1) continue;
    lastX = x;
    out.push(`${x},${y}`);
  }
  return out.join(' ');
}

function renderTile(p, now) {
  const el = p.el || buildTile(p);
  prune(p, now);
  const alarms = S.alarmsByPatient.get(p.id) || [];
  const top = highest(alarms);
  const open = alarms.filter((a) => a.state === 'raised' || a.state === 'escalated');
  setAttr(el, 'data-priority', top ? top.priority : null);
  setAttr(el, 'data-acked', top && !open.length ? 'true' : null);
  const chip = $('.chip', el);
  chip.hidden = !top;
  if (top) {
    setText(chip, top.priority.toUpperCase());
    setAttr(chip, 'data-priority', top.priority);
  }
  renderNews2(p, el);
  const footer = $('.tile-alarm', el);
  const shown = highest(open) || top;
  footer.hidden = !shown;
  if (shown) setText(footer, `${shown.message}${alarms.length > 1 ? ` (+${alarms.length - 1})` : ''}`);
  setAttr(el, 'aria-label', `Patient ${p.id}${top ? `, ${top.priority} priority alarm: ${top.message}` : ''}: open details`);

  const alarmByMetric = new Map();
  for (const a of alarms) {
    if (a.metric && (!alarmByMetric.has(a.metric) || PRIORITY_RANK[a.priority] > PRIORITY_RANK[alarmByMetric.get(a.metric)])) {
      alarmByMetric.set(a.metric, a.priority);
    }
  }
  for (const row of ROWS) {
    const present = row.metrics.filter((m) => p.latest.has(m));
    if (!present.length) continue;
    const entry = p.rows.get(row.key) || buildRow(p, row);
    let newest = 0;
    row.metrics.forEach((m, i) => {
      const latest = p.latest.get(m);
      setText(entry.values[i], latest ? formatValue(m, latest.v) : '–');
      if (latest) newest = Math.max(newest, latest.t);
    });
    const unit = p.latest.get(row.metrics[0])?.unit || METRICS[row.metrics[0]].unit;
    setText(entry.unit, unitLabel(unit));
    toggle(entry.el, 'stale', STREAMED.has(row.metrics[0]) && now - newest > STALE_MS);
    const priority = row.metrics.map((m) => alarmByMetric.get(m)).filter(Boolean)
      .sort((a, b) => PRIORITY_RANK[b] - PRIORITY_RANK[a])[0];
    setAttr(entry.el, 'data-alarm', priority || null);
    entry.el.title = `${row.metrics.map((m) => METRICS[m].name).join(' / ')} · ${newest ? ago(newest) : ''}`;
    // one scale for both lines of a row (systolic and diastolic share the BP row)
    let min = Infinity;
    let max = -Infinity;
    for (const m of row.metrics) {
      const points = p.series.get(m) || [];
      for (let i = lowerBound(points, now - SPARK_MS); i < points.length; i += 1) {
        if (points[i][1] < min) min = points[i][1];
        if (points[i][1] > max) max = points[i][1];
      }
    }
    if (min <= max) {
      const [lo, hi] = valueRange(row.metrics[0], [min, max]);
      row.metrics.forEach((m, i) => setAttr(entry.lines[i], 'points', sparkPoints(p.series.get(m) || [], now, lo, hi)));
    }
  }

  const devices = $('.devices', el);
  const keys = [...p.devices].sort();
  if (devices.childElementCount !== keys.length || keys.some((k, i) => devices.children[i].dataset.key !== k)) {
    devices.replaceChildren(...keys.map((k) => h('span', {class: 'dev', 'data-key': k},
      h('span', {class: 'dot'}), h('span', {class: 'dev-type'}), h('span', {class: 'dev-state'}), h('span', {class: 'batt'}))));
  }
  keys.forEach((key, i) => {
    const badge = devices.children[i];
    const d = S.devices.get(key);
    const [type, id] = key.split(':');
    const state = d ? (d.state === 'online' && d.silent ? 'silent' : d.state) : 'unknown';
    setAttr(badge, 'data-testid', `device-${type}-${id}`);
    setAttr(badge, 'data-state', state);
    setText($('.dev-type', badge), DEVICE_LABELS[type] || type);
    setText($('.dev-state', badge), state === 'online' ? '' : state);
    const battery = d?.battery;
    setText($('.batt', badge), battery === null || battery === undefined ? '' : `${battery}%`);
    toggle(badge, 'batt-low', battery !== null && battery !== undefined && battery < 20);
    badge.title = `${type} ${id}: ${state}${battery != null ? `, battery ${battery} %` : ''}${d?.last_seen_at ? `, last seen ${clock(Date.parse(d.last_seen_at))}` : ''}`;
  });
  // the tile stays when its monitor goes offline, and says so: the patient is no longer watched
  const down = [...new Set(keys.map((k) => k.split(':')[0])
    .filter((type, i) => CONTINUOUS.has(type) && S.devices.get(keys[i])?.state === 'offline'))];
  const marker = $('.tile-offline', el);
  marker.hidden = !down.length;
  setText(marker, down.length ? `${down.join(' and ')} offline` : '');
  setAttr(el, 'data-offline', down.length ? 'true' : null);
}

/** The NEWS2 badge: total and risk band; an incomplete score (inputs missing or stale) is a
 *  lower bound, shown as "≥ n" with a dashed outline and the missing inputs in its tooltip. */
function renderNews2(p, el) {
  const badge = $('.news2', el);
  const s = p.news2;
  badge.hidden = !s || !Object.keys(s.parameters || {}).length;
  if (badge.hidden) return;
  setText(badge, `NEWS2 ${s.complete ? '' : '≥'}${s.total}`);
  setAttr(badge, 'data-band', s.band);
  setAttr(badge, 'data-complete', s.complete ? 'true' : 'false');
  const absent = [...(s.missing || []).map((n) => `${NEWS2_LABELS[n] || n} missing`),
    ...(s.stale || []).map((n) => `${NEWS2_LABELS[n] || n} out of date`)];
  badge.title = `NEWS2 ${s.total}, ${s.band} clinical risk` + (s.complete ? '' : ` (incomplete: ${absent.join(', ')}; at least this score)`);
}

const NEWS2_LABELS = {respiratory_rate: 'RR', spo2: 'SpO₂', supplemental_oxygen: 'air/O₂', systolic_bp: 'systolic BP',
  heart_rate: 'pulse', consciousness: 'ACVPU', temperature: 'temperature'};

function setNews2(pid, score) {
  const p = ensurePatient(pid);
  if (p.news2 && Date.parse(p.news2.computed_at) > Date.parse(score.computed_at)) return;
  p.news2 = score;
  touch(pid);
}

function renderAlarms(now) {
  const list = $('#alarm-list');
  const alarms = [...S.alarms.values()].sort((a, b) =>
    (a.state === 'resolved') - (b.state === 'resolved')
    || ((a.state === 'acknowledged') - (b.state === 'acknowledged'))
    || PRIORITY_RANK[b.priority] - PRIORITY_RANK[a.priority]
    || Date.parse(b.raised_at) - Date.parse(a.raised_at));
  // move only what changed place: a ward may have a hundred alarms and a few change at a time
  alarms.forEach((a, i) => {
    const row = alarmRow(a, now);
    if (list.children[i] !== row) list.insertBefore(row, list.children[i] || null);
  });
  while (list.children.length > alarms.length) list.lastElementChild.remove();
  const active = alarms.filter((a) => a.state !== 'resolved');
  $('#alarms').hidden = alarms.length === 0;
  setText($('#alarm-count'), `${active.length} active alarm${active.length === 1 ? '' : 's'}`);
  const top = highest(active.filter((a) => a.state !== 'acknowledged'));
  setAttr($('#alarms'), 'data-priority', top ? top.priority : null);
}

const alarmRows = new Map(); // alert id -> row element (kept, so a fade-out is not restarted)

function alarmRow(a) {
  let row = alarmRows.get(a.id);
  if (!row) {
    const button = h('button', {type: 'button', class: 'ack', 'data-testid': `ack-${a.id}`}, 'Acknowledge');
    button.addEventListener('click', (e) => { e.stopPropagation(); acknowledge(a.id, button); });
    row = h('div', {class: 'alarm', 'data-testid': `alarm-${a.id}`, role: 'listitem'},
      h('span', {class: 'prio'}),
      h('button', {type: 'button', class: 'who', title: 'open the patient'}),
      h('span', {class: 'msg'}),
      h('span', {class: 'val'}),
      h('time', {class: 'at'}),
      h('span', {class: 'ack-info', 'data-testid': `ack-info-${a.id}`}),
      button);
    $('.who', row).addEventListener('click', () => { const pid = alarmPatient(S.alarms.get(a.id) || a); if (pid) openDetail(pid); });
    alarmRows.set(a.id, row);
  }
  const pid = alarmPatient(a);
  setAttr(row, 'data-priority', a.priority);
  setAttr(row, 'data-state', a.state);
  setText($('.prio', row), a.priority.toUpperCase());
  setText($('.who', row), pid || (a.device_id ? `${a.device_type} ${a.device_id}` : a.hospital_id));
  $('.who', row).disabled = !pid;
  const device = pid && a.kind === 'technical' && a.device_id ? ` · ${a.device_type} ${a.device_id}` : '';
  setText($('.msg', row), a.message + (a.rule_id === 'device.seq_gap' && a.count ? ` · ${a.count} missing` : '') + device);
  const unit = a.metric ? unitLabel(METRICS[a.metric]?.unit) : '';
  setText($('.val', row), a.value !== null && a.value !== undefined ? `${formatValue(a.metric, a.value)} ${unit}`.trim() : '');
  const at = Date.parse(a.raised_at);
  setText($('.at', row), clock(at));
  setAttr($('.at', row), 'datetime', a.raised_at);
  const info = a.state === 'acknowledged' || a.acknowledged_by
    ? `acknowledged by ${a.acknowledged_by}${a.acknowledged_at ? ` at ${clock(Date.parse(a.acknowledged_at))}` : ''}`
    : a.state === 'escalated' ? 'escalated' : a.state === 'resolved' ? 'resolved' : '';
  setText($('.ack-info', row), info);
  const button = $('.ack', row);
  const canAck = (a.state === 'raised' || a.state === 'escalated') && session.claims?.role !== 'patient';
  button.hidden = !canAck;
  if (canAck && button.disabled && button.textContent !== 'Acknowledging…') button.disabled = false;
  if (!canAck) { button.disabled = true; button.textContent = 'Acknowledge'; }
  if (a.state === 'resolved' && !row.classList.contains('resolved')) {
    // fade out (CSS transition), then the row goes when the alarm leaves the model
    requestAnimationFrame(() => row.classList.add('resolved'));
    setTimeout(() => alarmRows.delete(a.id), 2500);
  }
  return row;
}

function renderSummary() {
  const devices = [...S.devices.values()];
  const offline = devices.filter((d) => d.state === 'offline').length;
  const active = [...S.alarms.values()].filter((a) => a.state !== 'resolved');
  const by = (p) => active.filter((a) => a.priority === p).length;
  setText($('#summary'), `${S.patients.size} patients · ${devices.length} devices${offline ? ` (${offline} offline)` : ''}`
    + ` · alarms ${by('high')} high, ${by('medium')} medium, ${by('low')} low`);
  $('#empty').hidden = S.patients.size > 0 || !S.client;
  // a device no reading or binding has tied to a patient yet (e.g. offline since it started)
  const unlinked = devices.filter((d) => !S.deviceToPatient.has(devKey(d.device_type, d.device_id)))
    .sort((a, b) => devKey(a.device_type, a.device_id).localeCompare(devKey(b.device_type, b.device_id)));
  $('#unlinked').hidden = unlinked.length === 0;
  $('#unlinked-list').replaceChildren(...unlinked.map((d) => {
    const state = d.state === 'online' && d.silent ? 'silent' : d.state;
    return h('span', {class: 'dev', 'data-state': state, 'data-testid': `device-${d.device_type}-${d.device_id}`,
      title: `last seen ${d.last_seen_at ? clock(Date.parse(d.last_seen_at)) : 'never'}`},
    h('span', {class: 'dot'}), `${d.device_type} ${d.device_id}`, h('span', {class: 'dev-state'}, state),
    h('span', {class: 'batt'}, d.battery != null ? `${d.battery}%` : ''));
  }));
}

// --- patient detail --------------------------------------------------------------------------------

const detail = {pid: null, windowMs: WINDOWS['5m'], series: new Map(), seen: new Set(), loading: false,
  buffer: [], load: 0, rules: [], charts: new Map(), note: ''};

function openDetail(pid) {
  if (!S.patients.has(pid)) return;
  detail.pid = pid;
  detail.returnFocus = document.activeElement;
  const panel = $('#detail');
  panel.hidden = false;
  setText($('#detail-title'), `Patient ${pid}`);
  $('#detail-charts').replaceChildren();
  detail.charts.clear();
  loadDetail();
  $('#detail-close').focus();
}

function closeDetail() {
  if (!detail.pid) return;
  detail.pid = null;
  detail.load += 1;
  $('#detail').hidden = true;
  if (detail.returnFocus && document.contains(detail.returnFocus)) detail.returnFocus.focus();
}

async function loadDetail() {
  const pid = detail.pid;
  const load = ++detail.load;
  const windowMs = detail.windowMs;
  detail.series = new Map();
  detail.seen = new Set();
  detail.loading = true;
  detail.buffer = [];
  detail.note = 'loading…';
  dirty.detail = true;
  schedule();
  const start = Date.now() - windowMs;
  const base = `/api/patients/${encodeURIComponent(pid)}/readings`;
  try {
    api(`/api/patients/${encodeURIComponent(pid)}/alert-rules`).then((body) => {
      if (load === detail.load) { detail.rules = body.rules || []; dirty.detail = true; schedule(); }
    }).catch(() => {});
    let items = [];
    let note;
    if (windowMs <= WINDOWS['1h']) {
      // follow the cursors: at one reading per second an hour is 3,600 readings
      const result = await fetchPages(`${base}?since=${new Date(start).toISOString()}&limit=5000`, 8);
      items = result.items;
      note = `${items.length} readings${result.complete ? '' : ' (capped at 40,000: the newest may be missing)'}`;
    } else {
      // a day at 1 Hz is ~86,000 readings: sample the window in 144 slices of 10 minutes
      const slices = 144;
      const width = windowMs / slices;
      const jobs = Array.from({length: slices - 1}, (_, i) => [start + i * width, start + (i + 1) * width]);
      // the newest slice in full, so the chart meets the live data without a hole
      const recent = fetchPages(`${base}?since=${Math.round(start + (slices - 1) * width)}&limit=5000`, 2);
      const results = [];
      const worker = async () => {
        while (jobs.length && load === detail.load) {
          const [from, to] = jobs.shift();
          const body = await api(`${base}?since=${Math.round(from)}&until=${Math.round(to)}&limit=20`);
          results.push(...body.items);
        }
      };
      await Promise.all(Array.from({length: 6}, worker));
      items = results.concat((await recent).items);
      note = `${items.length} readings, sampled (the first 20 of every 10 minutes, all of the last 10)`;
    }
    if (load !== detail.load) return;
    for (const reading of items) detailAdd(reading, true);
    detail.note = `${note}, then live`;
  } catch (error) {
    if (load === detail.load) detail.note = `could not load the history: ${error.message}`;
  } finally {
    if (load === detail.load) {
      detail.loading = false;
      for (const reading of detail.buffer) detailAdd(reading, true);
      detail.buffer = [];
      dirty.detail = true;
      schedule();
    }
  }
}

function detailAdd(reading, force = false) {
  if (detail.loading && !force) { detail.buffer.push(reading); return; }
  const key = `${reading.device_type}/${reading.device_id}:${reading.seq}`;
  if (detail.seen.has(key)) return;
  detail.seen.add(key);
  const t = Date.parse(reading.ts);
  for (const [metric, value] of Object.entries(reading.metrics || {})) {
    if (!detail.series.has(metric)) detail.series.set(metric, []);
    insertPoint(detail.series.get(metric), t, value);
  }
  dirty.detail = true;
  schedule();
}

const CHARTS = [
  {key: 'heart_rate', metrics: ['heart_rate']},
  {key: 'spo2', metrics: ['spo2']},
  {key: 'bp', metrics: ['systolic_bp', 'diastolic_bp'], title: 'Blood pressure'},
  {key: 'respiratory_rate', metrics: ['respiratory_rate']},
  {key: 'temperature', metrics: ['temperature']},
  {key: 'glucose', metrics: ['glucose']},
  {key: 'weight', metrics: ['weight']},
];

function renderDetail(now) {
  if (!detail.pid) return;
  const p = S.patients.get(detail.pid);
  setText($('#detail-note'), detail.note);
  const alarms = (S.alarmsByPatient.get(detail.pid) || []).slice().sort((a, b) => PRIORITY_RANK[b.priority] - PRIORITY_RANK[a.priority]);
  $('#detail-alarms').replaceChildren(...alarms.map((a) => h('li', {'data-priority': a.priority},
    h('span', {class: 'prio'}, a.priority.toUpperCase()), ` ${a.message} · ${a.state}`,
    a.acknowledged_by ? ` by ${a.acknowledged_by}` : '')));
  $('#detail-devices').replaceChildren(...[...(p?.devices || [])].sort().map((key) => {
    const d = S.devices.get(key);
    return h('li', {}, `${key.replace(':', ' ')}: ${d ? d.state : 'unknown'}${d?.silent ? ' (silent)' : ''}`
      + `${d?.battery != null ? `, battery ${d.battery} %` : ''}${d?.firmware ? `, firmware ${d.firmware}` : ''}`);
  }));
  const container = $('#detail-charts');
  for (const chart of CHARTS) {
    if (!chart.metrics.some((m) => detail.series.get(m)?.length)) continue;
    let entry = detail.charts.get(chart.key);
    if (!entry) {
      const canvas = h('canvas', {'data-testid': `chart-${chart.key}`, role: 'img'});
      const caption = h('figcaption', {'data-testid': `chart-caption-${chart.key}`});
      const figure = h('figure', {class: `chart c-${chart.key}`, 'data-chart': chart.key}, caption, canvas);
      const order = CHARTS.map((c) => c.key);
      const next = [...container.children].find((c) => order.indexOf(c.dataset.chart) > order.indexOf(chart.key));
      container.insertBefore(figure, next || null);
      entry = {canvas, caption};
      detail.charts.set(chart.key, entry);
    }
    const m0 = chart.metrics[0];
    const last = chart.metrics.map((m) => detail.series.get(m)?.at(-1)?.[1]);
    setText(entry.caption, `${chart.title || METRICS[m0].name} · ${last.map((v, i) => formatValue(chart.metrics[i], v)).join('/')} ${unitLabel(METRICS[m0].unit)}`);
    entry.canvas.setAttribute('aria-label', `${chart.title || METRICS[m0].name} over the chosen window`);
    drawChart(entry.canvas, chart.metrics, now);
  }
}

function drawChart(canvas, metrics, now) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 140;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  const start = now - detail.windowMs;
  const pad = {l: 44, r: 8, t: 8, b: 18};
  const values = metrics.flatMap((m) => (detail.series.get(m) || []).filter(([t]) => t >= start).map(([, v]) => v));
  const rules = detail.rules.filter((r) => metrics.includes(r.metric));
  if (!values.length) return;
  let [lo, hi] = valueRange(metrics[0], values);
  const margin = (hi - lo) * 0.08;
  lo -= margin;
  hi += margin;
  const x = (t) => pad.l + ((t - start) / detail.windowMs) * (width - pad.l - pad.r);
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (height - pad.t - pad.b);
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = color('--muted');
  ctx.strokeStyle = color('--grid');
  ctx.lineWidth = 1;
  for (let i = 0; i <= 3; i += 1) {
    const v = lo + ((hi - lo) * i) / 3;
    ctx.beginPath(); ctx.moveTo(pad.l, y(v)); ctx.lineTo(width - pad.r, y(v)); ctx.stroke();
    ctx.fillText(formatValue(metrics[0], v), 4, y(v) + 4);
  }
  for (let i = 0; i <= 4; i += 1) {
    const t = start + (detail.windowMs * i) / 4;
    const label = detail.windowMs > WINDOWS['1h']
      ? HOUR_MINUTE.format(t) : clock(t);
    const w = ctx.measureText(label).width;
    ctx.fillText(label, Math.min(Math.max(x(t) - w / 2, pad.l), width - pad.r - w), height - 4);
  }
  // alarm limits in force for this patient, dashed, in the colour of their priority
  ctx.setLineDash([4, 4]);
  for (const rule of rules) {
    if (rule.threshold < lo || rule.threshold > hi) continue;
    ctx.strokeStyle = color(`--alarm-${rule.priority}`);
    ctx.beginPath(); ctx.moveTo(pad.l, y(rule.threshold)); ctx.lineTo(width - pad.r, y(rule.threshold)); ctx.stroke();
  }
  ctx.setLineDash([]);
  const gap = Math.max(detail.windowMs / 60, 30_000); // no line across a gap in the data
  metrics.forEach((m, i) => {
    const points = (detail.series.get(m) || []);
    ctx.strokeStyle = color(`--m-${m}`) || '#ddd';
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let previous = null;
    for (let j = lowerBound(points, start); j < points.length; j += 1) {
      const [t, v] = points[j];
      if (previous === null || t - previous > gap) ctx.moveTo(x(t), y(v)); else ctx.lineTo(x(t), y(v));
      previous = t;
    }
    ctx.stroke();
    const lastPoint = points.at(-1);
    if (lastPoint) {
      ctx.fillStyle = ctx.strokeStyle;
      ctx.beginPath(); ctx.arc(x(lastPoint[0]), y(lastPoint[1]), 2.5, 0, Math.PI * 2); ctx.fill();
    }
    if (i === 0) ctx.fillStyle = color('--muted');
  });
}

// --- page chrome: sign-in, header, errors, toasts -------------------------------------------------

function showSignIn(message) {
  $('#app').hidden = true;
  $('#signin').hidden = false;
  $('#signin-error').hidden = !message;
  setText($('#signin-error'), message || '');
  $('#token-input').value = '';
  $('#token-input').focus();
}

function showApp() {
  $('#signin').hidden = true;
  $('#app').hidden = false;
  const c = session.claims;
  setText($('#user'), c.sub);
  setText($('#role'), c.role);
  const select = $('#hospital');
  select.disabled = Boolean(session.patients.length);
  fillHospitals(Array.isArray(c.hospitals) ? c.hospitals : []);
  setText($('#scope-label'), session.patients.length ? `patient ${session.patients.join(', ')}` : '');
  $('#hospital-box').hidden = Boolean(session.patients.length);
  document.title = session.hospital ? `Ward ${session.hospital} · FirstCare` : 'FirstCare';
}

function fillHospitals(ids) {
  const select = $('#hospital');
  const all = new Set([...[...select.options].map((o) => o.value), ...ids, session.hospital].filter(Boolean));
  select.replaceChildren(...[...all].sort().map((id) => h('option', {value: id, selected: id === session.hospital}, id)));
}

function showError(message, kind = 'general') {
  const el = $('#error');
  el.dataset.kind = kind;
  setText($('#error-text'), message);
  $('#error-signin').hidden = kind !== 'access';
  el.hidden = false;
}

function hideError(kind) {
  const el = $('#error');
  if (!el.hidden && el.dataset.kind === kind) el.hidden = true;
}

function toast(message, level = 'info') {
  const el = h('div', {class: 'toast', 'data-level': level, role: 'status'}, message);
  $('#toasts').append(el);
  setTimeout(() => el.classList.add('gone'), 5000);
  setTimeout(() => el.remove(), 6000);
}

function boot() {
  readHash();
  stopWard();
  const result = signIn();
  if (!result.ok) { showSignIn(result.error); return; }
  $('#error').hidden = true;
  showApp();
  startWard();
}

// --- test and debugging hooks ------------------------------------------------------------------

const fc = {
  received: [],    // every event the page applied: {room, id, type, device, seq, patient}
  raw: [],         // every event envelope as it arrived, before de-duplication
  subscribed: [],  // every subscribe answer: {room, answer, since, replayed}
  frames: {count: 0, totalMs: 0, maxMs: 0}, // time spent in the batched per-frame redraws
  reloads: 0,      // snapshots loaded from the REST API
  resyncs: 0,      // resync answers received
  client: null,
  model: S,
  get state() { return S.client ? S.client.state : 'idle'; },
  get lastId() { return S.client ? Object.fromEntries(S.client.lastId) : {}; },
  get ws() { return S.client ? S.client.ws : null; },
  /** Drop the socket abruptly (close code 4000, as the server does for a slow consumer) and
   *  keep it down for at least `holdMs` before the normal backoff reconnects it. */
  dropConnection(holdMs = 0) { if (S.client) S.client.drop(holdMs); },
};
window.__fc = fc;

// --- wiring --------------------------------------------------------------------------------------

$('#signin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('#token-input').value.trim().replace(/^Bearer\s+/i, '');
  if (!token) return;
  sessionStorage.setItem('fc.token', token);
  const hospital = $('#signin-hospital').value.trim();
  if (hospital) sessionStorage.setItem('fc.hospital', hospital);
  boot();
});
$('#signout').addEventListener('click', () => signOut('Signed out.'));
$('#hospital').addEventListener('change', (e) => {
  sessionStorage.setItem('fc.hospital', e.target.value);
  history.replaceState(null, '', `${location.pathname}${location.search}#hospital=${encodeURIComponent(e.target.value)}`);
  boot();
});
$('#error-signin').addEventListener('click', () => signOut());
$('#ward').addEventListener('click', (e) => {
  const tile = e.target.closest('.tile');
  if (tile) openDetail(tile.dataset.patient);
});
$('#ward').addEventListener('keydown', (e) => {
  const tile = e.target.closest('.tile');
  if (tile && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); openDetail(tile.dataset.patient); }
});
$('#detail-close').addEventListener('click', closeDetail);
$('#detail-window').addEventListener('change', (e) => {
  detail.windowMs = WINDOWS[e.target.value];
  $('#detail-charts').replaceChildren();
  detail.charts.clear();
  loadDetail();
});
addEventListener('keydown', (e) => { if (e.key === 'Escape') closeDetail(); });
addEventListener('hashchange', () => {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get('token') || (params.get('hospital') && params.get('hospital') !== session.hospital)) boot();
});
addEventListener('resize', () => { dirty.detail = true; schedule(); });
setInterval(() => {
  // values go stale and sparklines scroll even when nothing arrives
  for (const pid of S.patients.keys()) dirty.tiles.add(pid);
  if (detail.pid) dirty.detail = true;
  schedule();
}, SWEEP_MS);

boot();
