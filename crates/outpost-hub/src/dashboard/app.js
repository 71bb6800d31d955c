// The outpost dashboard (docs/dashboard.md): plain JavaScript, no framework, nothing fetched
// from elsewhere. Views are #/ fragments; each builds its page once and refreshes its data
// when the hub's event stream (/v1/watch) says something changed.
'use strict';

const S = {
  me: null,
  csrf: sessionStorage.getItem('outpost.csrf'),
  es: null,
  refresh: null,
  pending: null,
  view: null,
};

const $ = (sel, el) => (el || document).querySelector(sel);

// h('tag.class#id', {attr: v, onclick: f}, child...) -> element
function h(spec, attrs, ...kids) {
  const m = spec.match(/^([a-z0-9]+)((?:[.#][\w-]+)*)$/i);
  const el = document.createElement(m[1]);
  for (const part of (m[2].match(/[.#][\w-]+/g) || [])) {
    if (part[0] === '.') el.classList.add(part.slice(1)); else el.id = part.slice(1);
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined || k === false) continue;
    el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return el;
}

// Replace el's children with kids (arrays flattened, null/false skipped).
function put(el, ...kids) {
  el.replaceChildren(...kids.flat(Infinity).filter((k) => k !== null && k !== undefined && k !== false));
}

function svg(tag, attrs) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function ago(ms) {
  if (!ms) return '';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.round(s / 60) + ' min ago';
  if (s < 86400) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

function table(head, rows, id) {
  return h('table', id ? { id } : {},
    h('thead', {}, h('tr', {}, head.map((c) => h('th', {}, c)))),
    h('tbody', {}, rows.length ? rows : [h('tr', {}, h('td.muted', { colspan: head.length }, 'none'))]));
}

const canMutate = () => S.me && S.me.role !== 'viewer';
const isAdmin = () => S.me && S.me.role === 'admin';

class Expired extends Error {}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: 'same-origin' };
  if (method !== 'GET' && method !== 'HEAD') opts.headers['X-CSRF-Token'] = S.csrf || '';
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (r.status === 401 && path !== '/v1/session') {
    expired();
    throw new Expired('session expired');
  }
  const text = await r.text();
  let data = text;
  try { data = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const e = new Error((data && data.message) || text || ('HTTP ' + r.status));
    e.status = r.status;
    throw e;
  }
  return data;
}

function showError(e) {
  if (e instanceof Expired) return;
  const el = $('#error');
  el.textContent = e ? String(e.message || e) : '';
  el.hidden = !e;
}

// ---------------------------------------------------------------------------------------------
// Session

function showLogin(note) {
  stopWatch();
  S.me = null;
  $('#top').hidden = true;
  $('#view').hidden = true;
  put($('#view'));
  S.refresh = null;
  $('#login-view').hidden = false;
  $('#login-note').textContent = note || '';
  $('#login-note').hidden = !note;
}

function expired() {
  sessionStorage.removeItem('outpost.csrf');
  S.csrf = null;
  showLogin('Your session expired. Log in again.');
}

async function login(ev) {
  ev.preventDefault();
  $('#login-error').hidden = true;
  try {
    const r = await api('POST', '/v1/session', {
      user: $('#login-user').value,
      password: $('#login-password').value,
    });
    S.csrf = r.csrf_token;
    sessionStorage.setItem('outpost.csrf', r.csrf_token);
    $('#login-password').value = '';
    start({ user: r.user, role: r.role, selector: r.selector });
  } catch (e) {
    $('#login-error').textContent = e.message;
    $('#login-error').hidden = false;
  }
}

async function logout() {
  try { await api('DELETE', '/v1/session'); } catch (_) { /* ended anyway */ }
  sessionStorage.removeItem('outpost.csrf');
  S.csrf = null;
  showLogin('Logged out.');
}

function start(me) {
  S.me = me;
  $('#login-view').hidden = true;
  $('#top').hidden = false;
  $('#view').hidden = false;
  $('#who').textContent = me.user + ' (' + me.role + (me.selector ? ', ' + me.selector : '') + ')';
  document.body.dataset.role = me.role;
  startWatch();
  route();
}

// ---------------------------------------------------------------------------------------------
// Live updates

function startWatch() {
  stopWatch();
  const es = new EventSource('/v1/watch');
  S.es = es;
  es.onopen = () => $('#live').classList.add('on');
  const poke = () => schedule();
  es.addEventListener('change', poke);
  es.addEventListener('tick', poke);
  es.onerror = async () => {
    $('#live').classList.remove('on');
    // a 401 closes the stream: find out whether the session ended
    try { await api('GET', '/v1/session'); } catch (e) { if (e.status === 401) expired(); }
  };
}

function stopWatch() {
  if (S.es) S.es.close();
  S.es = null;
  $('#live').classList.remove('on');
}

// Re-fetch the current view's data, at most every 300 ms.
function schedule() {
  if (S.pending || !S.refresh) return;
  S.pending = setTimeout(async () => {
    S.pending = null;
    const f = S.refresh;
    if (f) {
      try { await f(); showError(null); } catch (e) { showError(e); }
    }
  }, 300);
}

// ---------------------------------------------------------------------------------------------
// Routing

const VIEWS = [
  [/^#\/node\/(.+)$/, nodeView],
  [/^#\/rollouts$/, rolloutsView],
  [/^#\/alerts$/, alertsView],
  [/^#\/audit$/, auditView],
  [/^#\/gitops$/, gitopsView],
  [/^#\/pipelines$/, pipelinesView],
  [/^.*$/, overviewView],
];

async function route() {
  if (!S.me) return;
  const hash = location.hash || '#/';
  const root = $('#view');
  put(root);
  if (S.leave) { S.leave(); S.leave = null; }
  S.refresh = null;
  showError(null);
  for (const [re, view] of VIEWS) {
    const m = hash.match(re);
    if (m) {
      S.view = view.name;
      root.dataset.view = view.name;
      try {
        S.refresh = await view(root, ...m.slice(1).map(decodeURIComponent));
        if (S.refresh) await S.refresh();
      } catch (e) { showError(e); }
      return;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Overview

const FILTERS_KEY = 'outpost.filters';
const savedFilters = () => JSON.parse(localStorage.getItem(FILTERS_KEY) || '[]');

async function overviewView(root) {
  let offset = 0;
  const limit = 50;
  const sel = h('input#selector', { placeholder: 'label selector, e.g. site=a', size: 30, value: sessionStorage.getItem('outpost.selector') || '' });
  const saved = h('select#saved', {});
  const fillSaved = () => {
    put(saved, h('option', { value: '' }, 'saved filters'), savedFilters().map((f) => h('option', { value: f }, f)));
  };
  fillSaved();
  const apply = () => { offset = 0; sessionStorage.setItem('outpost.selector', sel.value.trim()); schedule(); };
  saved.addEventListener('change', () => { if (saved.value) { sel.value = saved.value; apply(); } });
  sel.addEventListener('keydown', (e) => { if (e.key === 'Enter') apply(); });
  const cards = h('div.cards#counts');
  const sites = h('div#sites');
  const alerts = h('div#firing');
  const list = h('div#nodes');
  const pager = h('div.toolbar#pager');
  root.append(
    h('h1', {}, 'Fleet'),
    h('div.toolbar', {}, sel,
      h('button#filter-apply', { type: 'button', onclick: apply }, 'Filter'),
      h('button#filter-save', { type: 'button', onclick: () => {
        const f = sel.value.trim();
        if (!f) return;
        const all = savedFilters().filter((x) => x !== f);
        all.unshift(f);
        localStorage.setItem(FILTERS_KEY, JSON.stringify(all.slice(0, 20)));
        fillSaved();
      } }, 'Save filter'),
      saved,
      h('button', { type: 'button', onclick: () => {
        localStorage.setItem(FILTERS_KEY, JSON.stringify(savedFilters().filter((x) => x !== sel.value.trim())));
        fillSaved();
      } }, 'Forget filter')),
    cards,
    h('div.grid2', {}, h('div', {}, h('h2', {}, 'Sites'), sites), h('div', {}, h('h2', {}, 'Firing alerts'), alerts)),
    h('h2', {}, 'Nodes'), pager, list);

  return async () => {
    const q = new URLSearchParams({ selector: sel.value.trim() });
    const [ov, pg] = await Promise.all([
      api('GET', '/v1/dashboard/overview?' + q),
      api('GET', '/v1/dashboard/nodes?' + q + '&offset=' + offset + '&limit=' + limit),
    ]);
    const c = ov.counts;
    const card = (key, label, cls, title) => h('div.card', { id: 'count-' + key, title },
      h('div.n' + (cls ? '.' + cls : ''), {}, String(c[key])), h('div.l', {}, label));
    put(cards, 
      card('total', 'nodes'),
      card('online', 'online', 'ok', 'in contact within ' + ov.stale_after_secs + ' s'),
      card('stale', 'stale', 'warn', 'missed check-ins: silent for more than ' + ov.stale_after_secs + ' s, not yet offline'),
      card('offline', 'offline', 'bad', 'silent for more than ' + ov.offline_after_secs + ' s'),
      card('degraded', 'degraded', 'warn', 'reachable, with a node condition or a workload not ready'),
      card('updating', 'updating', '', 'reachable, with a workload not yet on its desired revision'));
    put(sites, table([ov.group, 'nodes', 'online', 'stale', 'offline', 'degraded', 'updating'],
      ov.sites.map((s) => h('tr', {},
        h('td', {}, h('a', { href: '#/', onclick: (e) => { e.preventDefault(); sel.value = s.site ? ov.group + '=' + s.site : ''; apply(); } }, s.site || '(none)')),
        [s.counts.total, s.counts.online, s.counts.stale, s.counts.offline, s.counts.degraded, s.counts.updating].map((n) => h('td', {}, String(n)))))));
    put(alerts, table(['alert', 'node', 'subject', 'since', 'summary'],
      ov.alerts.map((a) => h('tr', {}, h('td.' + (a.severity === 'critical' ? 'bad' : 'warn'), {}, a.name),
        h('td', {}, h('a', { href: '#/node/' + encodeURIComponent(a.node) }, a.node)),
        h('td', {}, a.subject), h('td', {}, ago(a.started_at)), h('td', {}, a.summary)))));
    const last = Math.min(pg.offset + pg.limit, pg.total);
    put(pager, 
      h('button#prev', { type: 'button', disabled: pg.offset === 0, onclick: () => { offset = Math.max(0, offset - limit); schedule(); } }, 'Previous'),
      h('span#page-info', {}, pg.total ? (pg.offset + 1) + '-' + last + ' of ' + pg.total : 'no node'),
      h('button#next', { type: 'button', disabled: last >= pg.total, onclick: () => { offset += limit; schedule(); } }, 'Next'));
    put(list, table(['node', 'status', 'last contact', 'labels', 'agent', 'notes'],
      pg.nodes.map((n) => h('tr', { 'data-node': n.name },
        h('td', {}, h('a', { href: '#/node/' + encodeURIComponent(n.name) }, n.name)),
        h('td.' + n.reach, {}, n.reach + (n.degraded ? ', degraded' : '') + (n.updating ? ', updating' : '')),
        h('td', {}, ago(n.last_contact)),
        h('td', {}, Object.entries(n.labels).map(([k, v]) => h('span.pill', {}, k + '=' + v))),
        h('td', {}, n.agent_version || ''),
        h('td.muted', {}, n.reasons.join('; ')))), 'node-table'));
  };
}

// ---------------------------------------------------------------------------------------------
// Node page

function chart(title, points, key, max, unit) {
  const W = 240, H = 60;
  const box = h('div.chart', {}, h('div', {}, title + ': ',
    h('strong', {}, points.length ? points[points.length - 1][key].toFixed(1) + unit : 'no sample')));
  const s = svg('svg', { width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': title });
  s.append(svg('line', { x1: 0, y1: H - 1, x2: W, y2: H - 1, class: 'axis' }));
  if (points.length) {
    const t0 = points[0].at, t1 = points[points.length - 1].at;
    const top = max || Math.max(1, ...points.map((p) => p[key]));
    const xy = points.map((p) => {
      const x = t1 > t0 ? ((p.at - t0) / (t1 - t0)) * (W - 2) + 1 : W / 2;
      const y = H - 2 - (Math.min(p[key], top) / top) * (H - 4);
      return x.toFixed(1) + ',' + y.toFixed(1);
    });
    if (xy.length === 1) xy.push(xy[0]);
    s.append(svg('polyline', { points: xy.join(' ') }));
  }
  box.append(s, h('div.muted', {}, points.length ? points.length + ' points since ' + ago(points[0].at) : ''));
  return box;
}

async function nodeView(root, name) {
  const head = h('div#node-head');
  const charts = h('div.charts#vitals');
  const vitalsNote = h('div.muted#vitals-source');
  // The node's own 24 h history, through its link (GET /v1/nodes/{node}/vitals), fetched at
  // most once a minute; while it cannot be had, the samples the hub kept in memory.
  const hist = { at: 0, points: null, note: '' };
  const history = () => {
    if (Date.now() - hist.at < 60000) return hist.pending || hist;
    hist.at = Date.now();
    hist.pending = fetchHistory().finally(() => { hist.pending = null; });
    return hist.pending;
  };
  const fetchHistory = async () => {
    try {
      const r = await api('GET', '/v1/nodes/' + encodeURIComponent(name) + '/vitals?since=24h');
      hist.points = r.points;
      hist.note = 'From the node\'s own history: ' + r.samples + ' samples (one a minute) in the last 24 h'
        + (r.samples > r.points.length ? ', each point the peak of ' + Math.ceil(r.samples / Math.max(1, r.points.length)) : '') + '.';
    } catch (e) {
      hist.points = null;
      hist.note = 'Not from the node (' + e.message + '): showing the samples the hub received since it started.';
    }
    return hist;
  };
  const wl = h('div#workloads');
  const ev = h('div#events');
  const logSel = h('select#log-workload');
  const logOut = h('pre#log-out', {}, '');
  const termSel = h('select#term-workload');
  let workloadKeys = [];

  const tail = async () => {
    if (!logSel.value) return;
    const q = new URLSearchParams({ node: name, workload: logSel.value, tail: '100' });
    logOut.textContent = 'fetching through the node link...';
    try {
      const r = await api('GET', '/v1/logs?' + q);
      logOut.textContent = r.text || '(empty)';
      if (r.error) logOut.textContent += '\n' + r.error;
    } catch (e) { logOut.textContent = e.message; }
  };

  root.append(h('h1', {}, h('a', { href: '#/' }, 'Fleet'), ' / ', name), head,
    h('h2', {}, 'Vitals'), vitalsNote, charts,
    h('h2', {}, 'Workloads: desired and running'), wl,
    h('div.grid2', {},
      h('div', {}, h('h2', {}, 'Events'), ev),
      h('div', {}, h('h2', {}, 'Log tail'),
        h('div.toolbar', {}, logSel, h('button#log-fetch', { type: 'button', onclick: tail }, 'Fetch')), logOut)));
  if (canMutate()) root.append(h('h2', {}, 'Terminal'), terminal(name, termSel));

  return async () => {
    const [n, workloads, own] = await Promise.all([
      api('GET', '/v1/nodes/' + encodeURIComponent(name)),
      api('GET', '/v1/workloads'),
      history(),
    ]);
    if (n.status !== 'Online' && own.points) { own.points = null; own.at = 0; }
    const vitals = own.points || await api('GET', '/v1/dashboard/nodes/' + encodeURIComponent(name) + '/vitals');
    vitalsNote.className = own.points ? 'muted' : 'warn';
    vitalsNote.dataset.source = own.points ? 'node' : 'hub';
    vitalsNote.textContent = own.points ? own.note : (n.status !== 'Online'
      ? 'Node offline: showing the samples the hub received since it started.' : own.note);
    put(head, h('div.toolbar', {},
      h('strong#node-status.' + n.status, {}, n.status),
      h('span', {}, 'last contact ' + ago(n.last_seen || n.joined_at)),
      h('span', {}, 'agent ' + (n.agent_version || '?')),
      h('span', {}, 'uptime ' + (n.uptime_secs != null ? Math.round(n.uptime_secs / 60) + ' min' : '?'))),
    h('div', {}, Object.entries(n.labels).map(([k, v]) => h('span.pill', {}, k + '=' + v))),
    (n.conditions || []).map((c) => h('div.bad', {}, c.kind + ': ' + c.message)));
    put(charts, 
      chart('CPU', vitals, 'cpu', 100, ' %'), chart('Memory', vitals, 'mem', 100, ' %'),
      chart('Disk', vitals, 'disk', 100, ' %'), chart('Load (1 min)', vitals, 'load1', 0, ''));
    const status = new Map((n.workloads || []).map((w) => [w.key, w]));
    const rows = [];
    const keys = [];
    for (const w of workloads) {
      for (const p of w.placements.filter((p) => p.node === name)) {
        keys.push([p.key, w.namespace, w.name, w.kind]);
        const st = status.get(p.key) || p.status;
        const cs = st ? st.containers || [] : [];
        const reason = st ? [st.rollout && st.rollout.reason, ...cs.map((c) => c.reason || c.probe_failure)].filter(Boolean).join('; ') : 'not reported yet';
        rows.push(h('tr', { 'data-workload': p.key },
          h('td', {}, p.key),
          h('td', {}, String(p.desired_revision)),
          h('td', {}, st ? String(st.revision) : '-'),
          h('td.' + (st && st.phase === 'Running' && st.ready ? 'ok' : 'warn'), {}, st ? st.phase + (st.ready ? '' : ', not ready') : '-'),
          h('td.restarts', {}, String(cs.reduce((a, c) => a + (c.restarts || 0), 0))),
          h('td', {}, cs.map((c) => c.name + (c.pid ? ' pid ' + c.pid : '') + (c.started_at ? ', started ' + ago(c.started_at) : '')).join('; ')),
          h('td.muted', {}, reason)));
      }
    }
    put(wl, table(['workload', 'desired rev', 'running rev', 'phase', 'restarts', 'processes', 'reason'], rows, 'workload-table'));
    put(ev, table(['when', 'workload', 'reason', 'message'],
      (n.events || []).slice().reverse().slice(0, 30).map((e) => h('tr', {}, h('td', {}, ago(e.at)), h('td', {}, e.workload || ''), h('td', {}, e.reason), h('td', {}, e.message))), 'event-table'));
    const now = keys.map((k) => k[0]).join('|');
    if (now !== workloadKeys.join('|')) {
      workloadKeys = keys.map((k) => k[0]);
      for (const sel of [logSel, termSel]) {
        const keep = sel.value;
        put(sel, keys.map(([key]) => h('option', { value: key }, key)));
        if (keep) sel.value = keep;
      }
      if (isAdmin() && !termSel.querySelector('option[value=""]')) termSel.append(h('option', { value: '' }, 'node shell'));
    }
  };
}

// workload key "kind/namespace/name" -> [namespace, "kind/name"]
function splitKey(v) {
  const [kind, ns, name] = v.split('/');
  return [ns, kind + '/' + name];
}

// The node page's interactive terminal: one exec session with a TTY (docs/exec.md) running
// /bin/sh in the chosen workload (or a node shell, admins only). Key presses go to the session
// as stdin frames, batched while a POST is in flight so their order is kept; output frames are
// drawn by the emulator in term.js; the terminal's size follows the page (resize frames).
function terminal(node, sel) {
  const ROWS = 24;
  const screen = h('pre#term-screen', { tabindex: '0', 'aria-label': 'terminal' });
  const status = h('span#term-status.muted', {}, 'not connected');
  const connect = h('button#term-connect', { type: 'button' }, 'Connect');
  const hangup = h('button#term-disconnect', { type: 'button', disabled: true }, 'Disconnect');
  const measure = h('span.term-measure', {}, 'W'.repeat(10));
  const term = new window.Term(screen, ROWS, 80);
  let session = null; // { id, abort, queue, busy }

  const cols = () => {
    const w = measure.getBoundingClientRect().width / 10;
    const avail = screen.clientWidth - 16;
    return w > 0 && avail > 0 ? Math.max(20, Math.min(500, Math.floor(avail / w))) : 80;
  };
  const frame = (kind, payload) => {
    const out = new Uint8Array(5 + payload.length);
    out[0] = kind;
    new DataView(out.buffer).setUint32(1, payload.length);
    out.set(payload, 5);
    return out;
  };
  const enc = new TextEncoder();
  // Send what is queued, one POST at a time (order kept; keys pressed meanwhile go together).
  const flush = async () => {
    const s = session;
    if (!s || s.busy || !s.queue.length || !s.id) return;
    s.busy = true;
    const parts = s.queue.splice(0);
    const len = parts.reduce((a, p) => a + p.length, 0);
    const body = new Uint8Array(len);
    let at = 0;
    for (const p of parts) { body.set(p, at); at += p.length; }
    try {
      const r = await fetch('/v1/exec/' + encodeURIComponent(s.id) + '/input', {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/vnd.outpost.exec', 'X-CSRF-Token': S.csrf || '' },
        body,
      });
      if (r.status === 401) expired();
    } catch (_) { /* the output stream reports the end */ }
    s.busy = false;
    flush();
  };
  const send = (bytes) => {
    if (!session) return;
    session.queue.push(bytes);
    flush();
  };
  const ended = (msg) => {
    term.write('\r\n[' + msg + ']\r\n');
    status.textContent = msg;
    screen.classList.add('ended');
    session = null;
    connect.disabled = false;
    hangup.disabled = true;
  };

  const open = async () => {
    if (session) return;
    const c = cols();
    term.reset(ROWS, c);
    screen.classList.remove('ended');
    const body = { command: ['/bin/sh'], tty: true, stdin: true, rows: ROWS, cols: c };
    if (sel.value) {
      const [ns, w] = splitKey(sel.value);
      body.namespace = ns;
      body.workload = w;
    } else {
      body.node_shell = true;
    }
    const abort = new AbortController();
    session = { id: null, abort, queue: [], busy: false };
    connect.disabled = true;
    hangup.disabled = false;
    status.textContent = 'connecting through the node link...';
    let r;
    try {
      r = await fetch('/v1/nodes/' + encodeURIComponent(node) + '/exec', {
        method: 'POST', credentials: 'same-origin', signal: abort.signal,
        headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': S.csrf || '' },
        body: JSON.stringify(body),
      });
    } catch (e) { ended(String(e.message || e)); return; }
    if (r.status === 401) { expired(); ended('session expired'); return; }
    if (!r.ok) {
      const t = await r.text();
      let m = t;
      try { m = JSON.parse(t).message; } catch (_) { /* text */ }
      ended(m);
      return;
    }
    session.id = r.headers.get('x-outpost-exec-session');
    status.textContent = 'connected: ' + (sel.value || 'node shell') + ' (' + ROWS + 'x' + c + ')';
    screen.dataset.session = session.id || '';
    screen.focus();
    flush();
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = new Uint8Array(0);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const nb = new Uint8Array(buf.length + value.length);
        nb.set(buf); nb.set(value, buf.length);
        buf = nb;
        // frame: kind byte, 4-byte big-endian length, payload
        while (buf.length >= 5) {
          const len = new DataView(buf.buffer, buf.byteOffset + 1, 4).getUint32(0);
          if (buf.length < 5 + len) break;
          const kind = buf[0];
          const payload = buf.slice(5, 5 + len);
          buf = buf.slice(5 + len);
          if (kind === 1 || kind === 2) term.write(dec.decode(payload, { stream: true }));
          else if (kind === 3) {
            const x = JSON.parse(new TextDecoder().decode(payload) || '{}');
            ended('exit ' + (x.code != null ? x.code : '-') + (x.reason ? ': ' + x.reason : ''));
            return;
          }
        }
      }
      if (session) ended('the session ended without an exit code');
    } catch (e) {
      if (session) ended(abort.signal.aborted ? 'disconnected' : String(e.message || e));
    }
  };

  connect.addEventListener('click', open);
  hangup.addEventListener('click', () => { if (session) session.abort.abort(); });
  screen.addEventListener('click', () => screen.focus());
  screen.addEventListener('keydown', (e) => {
    if (!session) {
      if (e.key === 'Enter') { e.preventDefault(); open(); }
      return;
    }
    const k = window.termKeys(e);
    if (k === null) return;
    e.preventDefault();
    send(frame(4, enc.encode(k)));
  });
  screen.addEventListener('paste', (e) => {
    e.preventDefault();
    const t = (e.clipboardData && e.clipboardData.getData('text')) || '';
    if (session && t) send(frame(4, enc.encode(t.replace(/\r?\n/g, '\r'))));
  });
  const onResize = () => {
    const c = cols();
    if (c === term.cols) return;
    term.resize(ROWS, c);
    if (session && session.id) {
      const p = new Uint8Array(4);
      new DataView(p.buffer).setUint16(0, ROWS);
      new DataView(p.buffer).setUint16(2, c);
      send(frame(6, p));
    }
  };
  window.addEventListener('resize', onResize);
  S.leave = () => {
    window.removeEventListener('resize', onResize);
    if (session) session.abort.abort();
  };
  term.write('Choose a workload and press Connect (or Enter here) for a shell with a terminal.\r\n'
    + 'Every session is audited with its command line; it ends after 15 min.\r\n');
  return h('div#terminal', {},
    h('div.toolbar', {}, sel, connect, hangup, status), screen, measure);
}

// ---------------------------------------------------------------------------------------------
// Rollouts

async function rolloutsView(root) {
  const list = h('div#rollouts');
  root.append(h('h1', {}, 'Rollouts'), list);
  return async () => {
    const all = await api('GET', '/v1/rollouts');
    const details = await Promise.all(all.map((r) => {
      const [kind, ns, name] = r.workload.split('/');
      return api('GET', '/v1/objects/' + kind + '/' + ns + '/' + name + '/rollout').catch(() => r);
    }));
    put(list, ...details.map((r) => {
      const [kind, ns, name] = r.workload.split('/');
      const act = (a) => h('button.act-' + a + (a === 'abort' || a === 'undo' ? '.danger' : ''), {
        type: 'button', 'data-action': a,
        onclick: async () => {
          try {
            await api('POST', '/v1/objects/' + kind + '/' + ns + '/' + name + '/rollout/' + a);
            schedule();
          } catch (e) { showError(e); }
        },
      }, a);
      const stuck = (r.nodes || []).filter((n) => n.reason || (n.state !== 'Done' && n.state !== 'Pending'));
      return h('div.rollout', { 'data-workload': r.workload },
        h('h2', {}, r.workload + ' revision ' + r.revision + ' ',
          h('span.phase', { 'data-phase': r.phase }, r.phase), r.reason ? h('span.muted', {}, ' ' + r.reason) : null),
        h('div.toolbar', {}, 'policy ' + r.policy, ', updated ' + ago(r.updated_at),
          canMutate() ? [act('pause'), act('resume'), act('abort'), act('undo')] : null),
        table(['wave', 'state', 'nodes', 'per state'], r.waves.map((w) => h('tr', {},
          h('td', {}, w.name), h('td', {}, w.state), h('td', {}, String(w.nodes)),
          h('td', {}, Object.entries(w.counts).map(([k, v]) => h('span.pill', {}, k + ' ' + v)))))),
        stuck.length ? table(['node', 'wave', 'state', 'desired', 'running', 'reason'], stuck.map((n) => h('tr', {},
          h('td', {}, h('a', { href: '#/node/' + encodeURIComponent(n.node) }, n.node)), h('td', {}, n.wave != null ? String(n.wave) : '-'),
          h('td', {}, n.state), h('td', {}, String(n.desired_revision)), h('td', {}, n.running_revision != null ? String(n.running_revision) : '-'),
          h('td.muted', {}, n.reason || '')))) : null);
    }));
    if (!all.length) put(list, h('p.muted', {}, 'No rollout yet.'));
  };
}

// ---------------------------------------------------------------------------------------------
// Alerts, audit, GitOps, pipelines

async function alertsView(root) {
  const list = h('div#alerts');
  root.append(h('h1', {}, 'Alerts'), list);
  return async () => {
    const all = await api('GET', '/v1/alerts?all=true');
    put(list, table(['state', 'alert', 'severity', 'node', 'subject', 'started', 'resolved', 'summary'],
      all.map((a) => h('tr', {}, h('td.' + (a.state === 'Firing' ? 'bad' : 'ok'), {}, a.state), h('td', {}, a.name), h('td', {}, a.severity),
        h('td', {}, h('a', { href: '#/node/' + encodeURIComponent(a.node) }, a.node)), h('td', {}, a.subject),
        h('td', {}, ago(a.started_at)), h('td', {}, a.resolved_at ? ago(a.resolved_at) : ''), h('td', {}, a.summary)))));
  };
}

async function auditView(root) {
  const list = h('div#audit');
  root.append(h('h1', {}, 'Audit log'), list);
  return async () => {
    const all = await api('GET', '/v1/audit?limit=500');
    put(list, table(['when', 'user', 'action', 'target', 'detail', 'from', 'result'],
      all.slice().reverse().map((a) => h('tr', {}, h('td', { title: new Date(a.at).toISOString() }, ago(a.at)), h('td', {}, a.user),
        h('td', {}, a.action), h('td', {}, a.target), h('td', {}, a.detail), h('td', {}, a.peer), h('td', {}, a.result)))));
  };
}

async function gitopsView(root) {
  const list = h('div#gitops');
  root.append(h('h1', {}, 'GitOps'), list);
  return async () => {
    const all = await api('GET', '/v1/gitops');
    put(list, table(['repo', 'url', 'ref', 'running', 'fetched', 'last fetch', 'failures', 'error', 'rollouts'],
      all.map((g) => h('tr', {}, h('td', {}, g.namespace + '/' + g.name), h('td', {}, g.url), h('td', {}, g.git_ref),
        h('td', {}, (g.running || '').slice(0, 12)), h('td', {}, (g.fetched || '').slice(0, 12)), h('td', {}, ago(g.last_fetch)),
        h('td', {}, String(g.failures)), h('td.bad', {}, g.error || g.rejected || ''),
        h('td', {}, Object.entries(g.rollouts || {}).map(([k, v]) => h('span.pill', {}, k + ' ' + v)))))));
  };
}

async function pipelinesView(root) {
  const list = h('div#pipelines');
  root.append(h('h1', {}, 'Pipelines'), list);
  return async () => {
    const all = await api('GET', '/v1/pipelines');
    put(list, table(['pipeline', 'revision', 'streams', 'sinks', 'nodes', 'not running the revision'],
      all.map((p) => h('tr', {}, h('td', {}, p.namespace + '/' + p.name), h('td', {}, String(p.revision)),
        h('td', {}, p.streams.join(', ')), h('td', {}, p.sinks.join(', ')), h('td', {}, String(p.nodes.length)),
        h('td.muted', {}, p.placements.filter((x) => x.running_revision !== x.desired_revision || x.reason)
          .map((x) => x.node + (x.reason ? ': ' + x.reason : '')).join('; '))))));
  };
}

// ---------------------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', async () => {
  $('#login-form').addEventListener('submit', login);
  $('#logout').addEventListener('click', logout);
  window.addEventListener('hashchange', route);
  try {
    start(await api('GET', '/v1/session'));
  } catch (e) {
    showLogin(S.csrf ? 'Your session expired. Log in again.' : '');
  }
});
