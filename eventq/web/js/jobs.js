// The jobs table: pages from GET /api/jobs (keyset: each page continues after the last row
// of the one before), filters and sort kept in the URL, and only the rows in view in the
// DOM, so 10,000 jobs cost what 30 do. Events of the stream evolve the rows it holds
// (rows.js); waiting rows in view then take their position, reasons and estimate from the
// server again, once per burst of events.

import {ApiError, get, post, query} from './api.js';
import {announce, duration, h, jobLabel, when} from './dom.js';
import {TERMINAL, estimateWords, evolve, jobOf, reasonWords, rowOf} from './rows.js';

export const ROW_HEIGHT = 40;
const PAGE = 500;
const FIRST_PAGE = 200;
const OVERSCAN = 6;
const STATUS_WORDS = {
  '': null, pending: ['pending', 'waiting'], ready: ['pending'], waiting: ['waiting'],
  running: ['dispatched', 'running'], blocked: ['blocked'], held: ['held'], completed: ['completed'],
  failed: ['failed'], cancelled: ['cancelled'], rejected: ['rejected'],
};
const STATUS_RANK = {running: 0, dispatched: 1, pending: 2, waiting: 3, blocked: 4, held: 5,
  failed: 6, cancelled: 7, rejected: 8, completed: 9};
const KEYS = {
  submitted: (r) => r.job_id, priority: (r) => r.priority, status: (r) => STATUS_RANK[r.status] ?? 99,
  user: (r) => r.user, name: (r) => r.name, gpus: (r) => r.gpus,
};
const COLUMNS = [
  {label: 'Job', sort: 'name'}, {label: 'User', sort: 'user'}, {label: 'Status', sort: 'status'},
  {label: 'GPUs', sort: 'gpus'}, {label: 'Node'}, {label: 'Priority', sort: 'priority'},
  {label: 'Submitted', sort: 'submitted'}, {label: 'Position'}, {label: 'Why it waits, or what it did'},
  {label: 'Actions'},
];

/** The filters and sort of a #/jobs URL; "mine" unless the URL names a user (or none). */
export function filtersOf(params, ctx) {
  const f = {};
  for (const k of ['status', 'user', 'name', 'node', 'sort', 'order']) f[k] = params.get(k) ?? '';
  if (!params.has('user') && !ctx.admin) f.user = ctx.me.user;
  if (!KEYS[f.sort]) f.sort = 'submitted';
  if (f.order !== 'asc' && f.order !== 'desc') f.order = f.sort === 'name' || f.sort === 'user' ? 'asc' : 'desc';
  if (!(f.status in STATUS_WORDS)) f.status = '';
  return f;
}

export function compare(sort, order) {
  const key = KEYS[sort];
  const sign = order === 'desc' ? -1 : 1;
  return (a, b) => {
    const ka = key(a); const kb = key(b);
    if (ka !== kb) return (ka < kb ? -1 : 1) * sign;
    return (a.job_id < b.job_id ? -1 : a.job_id > b.job_id ? 1 : 0) * sign;
  };
}

export class JobsTable {
  constructor(ctx, filters) {
    this.ctx = ctx;
    this.filters = filters;
    this.rows = [];
    this.index = new Map();
    this.total = 0;
    this.next = null;
    this.loading = null;
    this.loaded = false;
    this.buffer = [];
    this.selected = new Set();
    // The <tr> last built for each row object: a row that did not change is not rebuilt.
    this.built = new WeakMap();
    this.order = compare(filters.sort, filters.order);
    this.statuses = STATUS_WORDS[filters.status] ? new Set(STATUS_WORDS[filters.status]) : null;
    this.applyTimes = [];
    this.asOf = 0;
    // [seq, +1 or -1] of each applied event that changed the count of matching jobs.
    this.deltas = [];
    // The seq of the event being applied; null while the table changes for other reasons.
    this.applying = null;
    this.refreshing = false;
    this.refreshAgain = false;
  }

  matches(row) {
    const f = this.filters;
    return (!this.statuses || this.statuses.has(row.status)) && (!f.user || row.user === f.user)
      && (!f.node || row.node === f.node)
      && (!f.name || row.name.toLowerCase().includes(f.name.toLowerCase()));
  }

  params(extra) {
    const f = this.filters;
    return query({status: f.status, user: f.user, name: f.name, node: f.node, sort: f.sort,
                  order: f.order, ...extra});
  }

  async loadFirst() {
    const page = await get('/api/jobs' + this.params({limit: FIRST_PAGE}));
    this.asOf = page.seq;
    this.take(page);
    this.loaded = true;
    for (const record of this.buffer.splice(0)) this.apply(record);
  }

  /** The next page, once: rows the stream already brought are not taken twice. */
  loadMore() {
    if (!this.next || this.loading) return this.loading;
    this.loading = get('/api/jobs' + this.params({limit: PAGE, after: this.next}))
      .then((page) => this.take(page)).finally(() => { this.loading = null; });
    return this.loading;
  }

  take(page) {
    for (const row of page.jobs) {
      if (this.index.has(row.job_id)) continue;
      this.index.set(row.job_id, this.rows.length);
      this.rows.push(row);
    }
    // The server counted every event up to page.seq; those after it that this table has
    // applied are counted on top (the stream may be ahead of the page, or behind it).
    this.deltas = this.deltas.filter(([seq]) => seq > page.seq);
    this.total = page.total + this.deltas.reduce((sum, [, d]) => sum + d, 0);
    this.next = page.next;
  }

  count(delta) {
    if (this.applying === null) return;
    this.deltas.push([this.applying, delta]);
    this.total = Math.max(0, this.total + delta);
  }

  reindex(from = 0) {
    for (let i = from; i < this.rows.length; i++) this.index.set(this.rows[i].job_id, i);
  }

  insert(row) {
    let lo = 0; let hi = this.rows.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.order(this.rows[mid], row) < 0) lo = mid + 1; else hi = mid;
    }
    this.count(+1);
    if (lo === this.rows.length && this.next) return;  // beyond what is loaded: its page brings it
    this.rows.splice(lo, 0, row);
    this.reindex(lo);
  }

  remove(at) {
    const [row] = this.rows.splice(at, 1);
    this.index.delete(row.job_id);
    this.selected.delete(row.job_id);
    this.reindex(at);
    this.count(-1);
  }

  /** One event of the stream; returns the ids of jobs it could not place (not loaded). */
  apply(record) {
    if (!this.loaded) { this.buffer.push(record); return null; }
    if (record.seq <= this.asOf) return null;  // the first page already shows it
    this.applying = record.seq;
    try {
      return this.applyOne(record);
    } finally {
      this.applying = null;
    }
  }

  applyOne(record) {
    if (record.type === 'job_submitted') {
      const row = rowOf(record);
      if (!this.index.has(row.job_id) && this.matches(row)) this.insert(row);
      return null;
    }
    if (record.type === 'jobs_purged') {
      for (const id of record.body.job_ids) if (this.index.has(id)) this.remove(this.index.get(id));
      return null;
    }
    const id = jobOf(record);
    if (!id) return null;
    const at = this.index.get(id);
    if (at === undefined) return id;
    const before = this.rows[at];
    const after = evolve(before, record);
    if (after === before) return null;
    if (!this.matches(after)) { this.remove(at); return null; }
    if (this.order(before, after) === 0 && this.order(after, before) === 0) { this.rows[at] = after; return null; }
    this.remove(at);
    this.insert(after);
    return null;
  }
}

export function mount(root, ctx, params) {
  const table = new JobsTable(ctx, filtersOf(params, ctx));
  const view = new JobsView(root, ctx, table);
  const stop = ctx.live.subscribe((record) => view.onEvent(record));
  view.start();
  return {unmount: () => { stop(); view.stopped = true; }, table, view};
}

class JobsView {
  constructor(root, ctx, table) {
    this.ctx = ctx;
    this.table = table;
    this.root = root;
    this.unknown = new Set();
    this.build();
  }

  build() {
    const f = this.table.filters;
    this.count = h('p', {class: 'count', id: 'jobs-count'}, 'Loading jobs…');
    this.bulk = h('button', {type: 'button', disabled: true, hidden: this.ctx.me.level === 'viewer',
      onclick: () => this.cancelSelected()}, 'Cancel selected');
    this.note = h('p', {class: 'note', 'aria-live': 'polite'});
    this.top = h('td', {colspan: COLUMNS.length + 1});
    this.bottom = h('td', {colspan: COLUMNS.length + 1});
    this.topRow = this.bottomRow = null;
    this.tbody = h('tbody', {});
    this.head = h('tr', {'aria-rowindex': 1}, h('th', {scope: 'col', class: 'select'},
      h('input', {type: 'checkbox', 'aria-label': 'Select every loaded job', onchange: (e) => this.selectAll(e.target.checked)})),
    COLUMNS.map((c) => this.headerCell(c)));
    this.tableEl = h('table', {class: 'jobs', 'aria-label': 'Jobs', 'aria-rowcount': 1}, h('thead', {}, this.head), this.tbody);
    this.scroller = h('div', {class: 'scroller', tabindex: 0, role: 'region', 'aria-label': 'Jobs, scrollable'}, this.tableEl);
    this.scroller.addEventListener('scroll', () => this.schedule(), {passive: true});
    this.root.append(h('h1', {}, 'Jobs'), this.filterForm(f),
      h('div', {class: 'toolbar'}, this.count, this.bulk), this.note, this.scroller, priorityDialog(this));
  }

  headerCell(c) {
    const f = this.table.filters;
    if (!c.sort) return h('th', {scope: 'col'}, c.label);
    const sorted = f.sort === c.sort ? (f.order === 'asc' ? 'ascending' : 'descending') : null;
    return h('th', {scope: 'col', 'aria-sort': sorted || undefined},
      h('button', {type: 'button', class: 'sort', dataset: {sort: c.sort}, onclick: () => this.sortBy(c.sort)}, c.label,
        h('span', {'aria-hidden': 'true'}, sorted === 'ascending' ? ' ▲' : sorted === 'descending' ? ' ▼' : '')));
  }

  filterForm(f) {
    const field = (id, label, value, extra = {}) => [h('label', {for: id}, label),
      h('input', {id, name: id.slice(2), type: 'search', value, ...extra})];
    const status = h('select', {id: 'f-status', name: 'status'}, Object.keys(STATUS_WORDS).map((s) =>
      h('option', {value: s, selected: s === f.status}, s || 'any')));
    return h('form', {role: 'search', 'aria-label': 'Filter jobs', class: 'filters', onsubmit: (e) => {
      e.preventDefault();
      const data = new FormData(e.target);
      const next = {...this.table.filters};
      for (const k of ['status', 'user', 'name', 'node']) next[k] = (data.get(k) || '').trim();
      this.reload(next);
    }},
    h('label', {for: 'f-status'}, 'Status'), status,
    ...field('f-user', 'User', f.user), ...field('f-name', 'Name', f.name),
    ...field('f-node', 'Node', f.node), h('button', {type: 'submit'}, 'Filter'));
  }

  /** New filters or sort: the URL says them (a link to share), and the rows load again. */
  reload(filters) {
    history.replaceState(null, '', `#/jobs${urlOf(filters, this.ctx)}`);
    const focus = document.activeElement && document.activeElement.dataset.sort;
    const table = new JobsTable(this.ctx, filters);
    this.table = table;
    this.root.replaceChildren();
    this.build();
    const again = [...this.root.querySelectorAll('button.sort')].find((b) => b.dataset.sort === focus);
    if (again) again.focus();
    this.start();
  }

  sortBy(sort) {
    const f = this.table.filters;
    const order = f.sort === sort ? (f.order === 'asc' ? 'desc' : 'asc')
      : (sort === 'name' || sort === 'user' ? 'asc' : 'desc');
    this.reload({...f, sort, order});
  }

  async start() {
    const started = performance.now();
    try {
      await this.table.loadFirst();
    } catch (e) {
      this.count.textContent = `Could not load the jobs: ${e.message}`;
      return;
    }
    this.render();
    this.firstRender = performance.now() - started;
    performance.mark('jobs-table-rendered');
    this.refreshVisible();
  }

  onEvent(record) {
    const started = performance.now();
    const lost = this.table.apply(record);
    if (lost && (this.table.statuses || this.table.filters.node)) this.unknown.add(lost);
    if (!this.table.loaded) return;
    this.render();
    this.table.applyTimes.push(performance.now() - started);
    if (this.table.applyTimes.length > 5000) this.table.applyTimes.splice(0, 1000);
    this.refreshVisible();
  }

  schedule() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => { this.pending = null; this.render(); });
  }

  /** The rows in view (and a few around them), spacers for the rest. */
  render() {
    const t = this.table;
    const height = this.scroller.clientHeight || 600;
    const first = Math.max(0, Math.floor(this.scroller.scrollTop / ROW_HEIGHT) - OVERSCAN);
    const last = Math.min(t.total, first + Math.ceil(height / ROW_HEIGHT) + 2 * OVERSCAN);
    this.top.style.height = `${first * ROW_HEIGHT}px`;
    this.bottom.style.height = `${Math.max(0, t.total - last) * ROW_HEIGHT}px`;
    const out = [this.topRow || (this.topRow = h('tr', {class: 'spacer', 'aria-hidden': 'true'}, this.top))];
    for (let i = first; i < last; i++) {
      const row = t.rows[i];
      if (!row) {
        out.push(h('tr', {class: 'job', 'aria-rowindex': i + 2}, h('td', {colspan: COLUMNS.length + 1}, 'Loading…')));
        continue;
      }
      let tr = t.built.get(row);
      if (!tr || tr.dataset.selected !== String(t.selected.has(row.job_id))) {
        tr = this.rowElement(row, i);
        t.built.set(row, tr);
      } else if (tr.getAttribute('aria-rowindex') !== String(i + 2)) {
        tr.setAttribute('aria-rowindex', i + 2);
      }
      out.push(tr);
    }
    out.push(this.bottomRow || (this.bottomRow = h('tr', {class: 'spacer', 'aria-hidden': 'true'}, this.bottom)));
    const focused = this.tbody.contains(document.activeElement) ? focusKey(document.activeElement) : null;
    reconcile(this.tbody, out);
    if (focused && !this.tbody.contains(document.activeElement)) this.tbody.querySelector(`[data-focus="${focused}"]`)?.focus();
    this.tableEl.setAttribute('aria-rowcount', t.total + 1);
    this.count.textContent = `${t.total} ${t.total === 1 ? 'job' : 'jobs'}`;
    this.bulk.disabled = t.selected.size === 0;
    this.bulk.textContent = `Cancel selected (${t.selected.size})`;
    if (last > t.rows.length && t.next && !t.loading) t.loadMore().then(() => this.render());
  }

  rowElement(row, i) {
    const label = jobLabel(row);
    const mayAct = this.ctx.admin || row.user === this.ctx.me.user;
    return h('tr', {class: `job status-${row.status}`, 'aria-rowindex': i + 2,
      dataset: {selected: String(this.table.selected.has(row.job_id))}},
      h('td', {class: 'select'}, mayAct && !TERMINAL.has(row.status) ? h('input', {type: 'checkbox',
        'aria-label': `Select ${label}`, checked: this.table.selected.has(row.job_id), dataset: {focus: `sel-${row.job_id}`},
        onchange: (e) => this.select(row.job_id, e.target.checked)}) : null),
      rowCells(row),
      h('td', {class: 'actions'}, mayAct ? this.actions(row, label) : null));
  }

  actions(row, label) {
    const act = (word, path) => h('button', {type: 'button', dataset: {focus: `${word}-${row.job_id}`},
      onclick: () => this.act(path, `${word} ${label}`)}, word, h('span', {class: 'visually-hidden'}, ` ${label}`));
    const out = [];
    const s = row.status;
    if (!TERMINAL.has(s)) out.push(act('Cancel', `/api/queue/${row.job_id}/cancel`));
    if (s === 'pending' || s === 'waiting') out.push(act('Hold', `/api/queue/${row.job_id}/hold`));
    if (s === 'held') out.push(act('Release', `/api/queue/${row.job_id}/release`));
    if (s === 'failed' || s === 'cancelled') out.push(act('Retry', `/api/queue/${row.job_id}/retry`));
    if (this.ctx.lead && (s === 'pending' || s === 'waiting' || s === 'held')) {
      out.push(h('button', {type: 'button', dataset: {focus: `prio-${row.job_id}`},
        onclick: () => this.askPriority(row)}, 'Priority', h('span', {class: 'visually-hidden'}, ` ${label}`)));
    }
    return out;
  }

  async act(path, what) {
    try {
      await post(path);
      announce(`${what}: done`);
      this.note.textContent = `${what}: done.`;
    } catch (e) {
      this.note.textContent = `${what}: ${e.message}`;
    }
  }

  select(id, on) {
    if (on) this.table.selected.add(id); else this.table.selected.delete(id);
    this.render();
  }

  selectAll(on) {
    const t = this.table;
    t.selected.clear();
    if (on) for (const row of t.rows) if (!TERMINAL.has(row.status) && (this.ctx.admin || row.user === this.ctx.me.user)) t.selected.add(row.job_id);
    this.render();
  }

  async cancelSelected() {
    const ids = [...this.table.selected];
    const results = await Promise.allSettled(ids.map((id) => post(`/api/queue/${id}/cancel`)));
    const failed = results.filter((r) => r.status === 'rejected');
    this.table.selected.clear();
    this.note.textContent = failed.length
      ? `Cancelled ${ids.length - failed.length} of ${ids.length}: ${failed[0].reason.message}`
      : `Cancelled ${ids.length} ${ids.length === 1 ? 'job' : 'jobs'}.`;
    announce(this.note.textContent);
    this.render();
  }

  askPriority(row) {
    this.priorityRow = row;
    const dialog = this.root.querySelector('dialog');
    dialog.querySelector('#prio-title').textContent = `Priority of ${jobLabel(row)}`;
    dialog.querySelector('input').value = row.priority;
    dialog.showModal();
  }

  /** Waiting rows in view: their position, reasons and estimate, as the server says now. */
  async refreshVisible() {
    if (this.refreshing) { this.refreshAgain = true; return; }
    const rows = [...this.tbody.querySelectorAll('tr.job')].map((tr) => this.table.rows[+tr.getAttribute('aria-rowindex') - 2]);
    const ids = rows.filter((r) => r && !TERMINAL.has(r.status)).map((r) => r.job_id);
    ids.push(...this.unknown);
    this.unknown.clear();
    if (!ids.length || this.stopped) return;
    this.refreshing = true;
    try {
      const page = await get('/api/jobs' + query({ids: [...new Set(ids)].slice(0, 40).join(',')}));
      this.merge(page.jobs);
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
    } finally {
      this.refreshing = false;
      if (this.refreshAgain) { this.refreshAgain = false; this.refreshVisible(); }
    }
  }

  merge(fresh) {
    const t = this.table;
    for (const row of fresh) {
      const at = t.index.get(row.job_id);
      if (at !== undefined && same(t.rows[at], row)) continue;
      if (at !== undefined && t.matches(row) && t.order(t.rows[at], row) === 0) { t.rows[at] = row; continue; }
      if (at !== undefined) t.remove(at);
      if (t.matches(row)) t.insert(row);
    }
    this.render();
  }
}

/** The query of a #/jobs URL: what differs from the defaults ("mine" for non-admins). */
export function urlOf(f, ctx) {
  const q = new URLSearchParams();
  for (const k of ['status', 'name', 'node']) if (f[k]) q.set(k, f[k]);
  if (f.sort !== 'submitted' || f.order !== 'desc') { q.set('sort', f.sort); q.set('order', f.order); }
  if (ctx.admin ? f.user : f.user !== ctx.me.user) q.set('user', f.user);
  const text = q.toString();
  return text ? `?${text}` : '';
}

/** Make ``parent``'s children ``nodes`` touching only what differs: rows that stay in view
 * are not taken out and put back, which would cost the browser their style and layout again. */
export function reconcile(parent, nodes) {
  const wanted = new Set(nodes);
  for (const child of [...parent.children]) if (!wanted.has(child)) child.remove();
  nodes.forEach((node, i) => {
    if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
  });
}

/** Does a fresh row from the server show what the held one shows? */
function same(a, b) {
  return a.status === b.status && a.position === b.position && a.estimated_start === b.estimated_start
    && a.node === b.node && a.priority === b.priority && a.attempt === b.attempt
    && JSON.stringify(a.reasons || []) === JSON.stringify(b.reasons || [])
    && JSON.stringify(a.estimate_basis || null) === JSON.stringify(b.estimate_basis || null);
}

function focusKey(el) {
  return el.dataset ? el.dataset.focus : null;
}

/** The cells of one job's row, shared with the benchmark's plain full table. */
export function rowCells(row) {
  return [
    h('td', {class: 'name'}, h('a', {href: `#/job/${row.job_id}`}, row.name || row.job_id), ' ',
      h('span', {class: 'id'}, row.job_id)),
    h('td', {}, row.user),
    h('td', {}, h('span', {class: `badge ${row.status}`}, row.status)),
    h('td', {class: 'num'}, String(row.gpus)),
    h('td', {}, row.node || '—'),
    h('td', {class: 'num'}, String(row.priority)),
    h('td', {}, when(row.queued_at)),
    h('td', {class: 'num'}, row.position ?? '—'),
    h('td', {class: 'why'}, story(row)),
  ];
}

/** What a row says in words: why it waits and when it should start, or what it did. */
export function story(row) {
  const s = row.status;
  if (s === 'running' || s === 'dispatched') {
    return `on ${row.node} GPU ${(row.allocated_gpus || []).join(', ') || '—'} since ${when(row.started_at)}`;
  }
  if (TERMINAL.has(s)) {
    const took = row.started_at && row.completed_at ? ` after ${duration(row.completed_at - row.started_at)}` : '';
    if (s === 'completed') return `completed${took}`;
    return [s + took, row.exit_code !== null && row.exit_code !== undefined ? `exit ${row.exit_code}` : '', row.error || '',
      ...(row.reasons || []).map(reasonWords)].filter(Boolean).join('; ');
  }
  const parts = (row.reasons || []).map(reasonWords);
  const start = estimateWords(row);
  if (start) parts.push(start);
  return parts.join('; ') || 'about to be placed';
}

function priorityDialog(view) {
  const input = h('input', {id: 'prio-value', type: 'number', min: 0, max: 1000, required: true});
  const error = h('p', {class: 'error', role: 'alert'});
  const dialog = h('dialog', {'aria-labelledby': 'prio-title'},
    h('form', {method: 'dialog', onsubmit: async (e) => {
      if (e.submitter && e.submitter.value === 'cancel') return;
      e.preventDefault();
      const row = view.priorityRow;
      try {
        await post(`/api/queue/${row.job_id}/priority`, {priority: +input.value});
        dialog.close();
        announce(`Priority of ${jobLabel(row)} set to ${input.value}`);
      } catch (err) { error.textContent = err.message; }
    }},
    h('h2', {id: 'prio-title'}, 'Priority'),
    h('label', {for: 'prio-value'}, 'New priority (0 low … 30 urgent)'), input, error,
    h('div', {class: 'buttons'}, h('button', {type: 'submit', value: 'save'}, 'Set priority'),
      h('button', {type: 'submit', value: 'cancel', formnovalidate: true}, 'Keep it'))));
  return dialog;
}
