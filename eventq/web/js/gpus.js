// The GPUs-over-time view: the timeline from GET /api/gpus/timeline, then kept current by
// the stream: a dispatch opens a bar, a release closes it. The "now" line moves with the
// clock; nothing is fetched again unless the stream brings something the view cannot place.

import {get, query} from './api.js';
import {h} from './dom.js';
import {gantt} from './gantt.js';

const WINDOWS = {'Last 10 minutes': 600, 'Last hour': 3600, 'Last 6 hours': 6 * 3600, 'Last 24 hours': 86400};
const ENDS = {job_completed: 'completed', job_failed: 'failed', job_cancelled: 'cancelled', job_requeued: 'requeued'};

export function mount(root, ctx, params) {
  const view = {data: null, window: +(params.get('window') || 3600), by: params.get('by') || 'user', skew: 0, users: new Map()};
  const box = h('div', {});
  const controls = h('div', {class: 'toolbar'},
    h('label', {for: 'g-window'}, 'Show'), h('select', {id: 'g-window', onchange: (e) => { view.window = +e.target.value; keep(view); load(); }},
      Object.entries(WINDOWS).map(([k, v]) => h('option', {value: v, selected: v === view.window}, k))),
    h('label', {for: 'g-by'}, 'Colour by'), h('select', {id: 'g-by', onchange: (e) => { view.by = e.target.value; keep(view); draw(); }},
      h('option', {value: 'user', selected: view.by === 'user'}, 'user'), h('option', {value: 'priority', selected: view.by === 'priority'}, 'priority')));
  root.append(h('h1', {}, 'GPUs over time'), controls, box);
  const draw = () => {
    if (!view.data) return;
    const now = Date.now() / 1000 + view.skew;
    const focused = document.activeElement && box.contains(document.activeElement) ? document.activeElement.getAttribute('href') : null;
    box.replaceChildren(gantt({...view.data, now, since: now - view.window, until: now + view.window / 20}, {by: view.by}));
    if (focused) box.querySelector(`[href="${focused}"]`)?.focus();
  };
  let loading = false;
  const load = async () => {
    if (loading) return;
    loading = true;
    try {
      const now = Date.now() / 1000;
      const data = await get('/api/gpus/timeline' + query({since: Math.floor(now - view.window), until: Math.ceil(now + 60)}));
      view.skew = data.now - Date.now() / 1000;  // the server's clock draws "now"
      await nameBars(data.bars, view.users);
      view.data = data;
      draw();
    } catch (e) {
      box.replaceChildren(h('p', {class: 'error', role: 'alert'}, `The timeline could not be read: ${e.message}`));
    } finally { loading = false; }
  };
  const stop = ctx.live.subscribe((record) => { if (view.data && apply(view, record) === 'unknown') load(); else draw(); });
  const tick = setInterval(draw, 10000);  // moves the "now" line; fetches nothing
  load();
  return {unmount: () => { stop(); clearInterval(tick); }};
}

/** The window and the colouring in the URL, so that a link shows what this page shows. */
function keep(view) {
  const q = new URLSearchParams();
  if (view.window !== 3600) q.set('window', view.window);
  if (view.by !== 'user') q.set('by', view.by);
  const text = q.toString();
  history.replaceState(null, '', `#/gpus${text ? `?${text}` : ''}`);
}

/** The timeline names jobs by id: their names come from the jobs table's rows. */
export async function nameBars(bars, known) {
  const missing = [...new Set(bars.filter((b) => !known.has(b.job_id)).map((b) => b.job_id))];
  for (let i = 0; i < missing.length; i += 40) {
    const page = await get('/api/jobs' + query({ids: missing.slice(i, i + 40).join(',')}));
    for (const row of page.jobs) known.set(row.job_id, {user: row.user, name: row.name, priority: row.priority});
  }
  for (const bar of bars) if (known.has(bar.job_id)) bar.name = known.get(bar.job_id).name;
}

/** A bar opens at a dispatch and closes at the release of its GPUs. */
export function apply(view, record) {
  const b = record.body;
  const bars = view.data.bars;
  if (record.type === 'job_submitted') {
    view.users.set(b.job.job_id, {user: b.job.user, name: b.job.name, priority: b.job.priority_override ?? b.job.priority});
  } else if (record.type === 'attempt_dispatched') {
    const known = view.users.get(b.job_id);
    if (!known) return 'unknown';
    if (!view.data.lanes.some((l) => l.node === b.node)) return 'unknown';
    bars.push({job_id: b.job_id, name: known.name, attempt: b.attempt, user: known.user, priority: known.priority,
      node: b.node, gpus: b.gpus, start: record.time, end: null, status: 'running'});
  } else if (record.type === 'gpus_released') {
    const bar = bars.find((x) => x.job_id === b.job_id && x.attempt === b.attempt && x.end === null);
    if (bar) bar.end = record.time;
  } else if (ENDS[record.type]) {
    for (const bar of bars) if (bar.job_id === b.job_id && (bar.status === 'running' || bar.status === 'dispatched')) bar.status = ENDS[record.type];
  } else if (record.type === 'node_inventory_reported' || record.type === 'worker_connected' || record.type === 'worker_removed') {
    return 'unknown';
  }
  return null;
}
