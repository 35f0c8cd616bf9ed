// Replay: the queue, its reasons and the GPUs as they were right after any event of the
// log (GET /api/replay/state?at=SEQ, or ?time=), chosen with a scrubber, a step of one
// event either way, or a time. The server rebuilds that state from the log.

import {get, query} from './api.js';
import {empty, h, when} from './dom.js';
import {gantt} from './gantt.js';
import {nameBars} from './gpus.js';
import {reasonWords} from './rows.js';

export function mount(root, ctx, params) {
  const view = {seq: params.has('at') ? +params.get('at') : null, head: ctx.live.lastSeq || 1, busy: false, again: null};
  const slider = h('input', {id: 'r-seq', type: 'range', min: 1, max: view.head, step: 1, value: view.seq ?? view.head,
    oninput: (e) => go({at: +e.target.value})});
  const number = h('output', {id: 'r-out', for: 'r-seq'});
  const time = h('input', {id: 'r-time', type: 'datetime-local', step: 1});
  const asOf = h('p', {class: 'as-of'});
  const box = h('div', {});
  root.append(h('h1', {}, 'Replay'),
    h('div', {class: 'scrubber'},
      h('label', {for: 'r-seq'}, 'Event'), slider, number,
      h('button', {type: 'button', onclick: () => go({at: Math.max(1, (view.seq ?? view.head) - 1)})}, 'Previous event'),
      h('button', {type: 'button', onclick: () => go({at: Math.min(view.head, (view.seq ?? view.head) + 1)})}, 'Next event'),
      h('button', {type: 'button', onclick: () => go({at: view.head})}, 'Latest event')),
    h('form', {class: 'scrubber', onsubmit: (e) => {
      e.preventDefault();
      if (time.value) go({time: new Date(time.value).getTime() / 1000});
    }}, h('label', {for: 'r-time'}, 'Time'), time, h('button', {type: 'submit'}, 'Go to time')),
    asOf, box);

  async function go(where) {
    if (view.busy) { view.again = where; return; }
    view.busy = true;
    try {
      const state = await get('/api/replay/state' + query(where));
      view.seq = state.seq;
      view.head = state.head_seq;
      slider.max = state.head_seq;
      slider.value = state.seq;
      slider.setAttribute('aria-valuetext', `event ${state.seq} of ${state.head_seq}, ${when(state.time)}`);
      number.textContent = `${state.seq} of ${state.head_seq}`;
      history.replaceState(null, '', `#/replay?at=${state.seq}`);
      asOf.textContent = `As of event ${state.seq}, ${when(state.time)}`;
      const timeline = await get('/api/gpus/timeline' + query({since: Math.floor(state.time - 3600), until: Math.ceil(state.time)}));
      await nameBars(timeline.bars, new Map(state.jobs.map((j) => [j.job_id, j])));
      render(box, state, timeline);
    } catch (e) {
      asOf.textContent = `That state could not be rebuilt: ${e.message}`;
    } finally {
      view.busy = false;
      if (view.again) { const next = view.again; view.again = null; go(next); }
    }
  }

  const stop = ctx.live.subscribe((record) => {
    view.head = Math.max(view.head, record.seq);
    slider.max = view.head;
    number.textContent = `${view.seq ?? view.head} of ${view.head}`;
  });
  go(view.seq ? {at: view.seq} : {at: view.head});
  return {unmount: stop};
}

/** The bars as they stood at the replayed time: what ended later was still running. */
export function asOfTime(timeline, t) {
  const bars = timeline.bars.filter((b) => b.start <= t).map((b) => (b.end === null || b.end > t ? {...b, end: null, status: 'running'} : b));
  return {...timeline, bars, now: t, since: t - 3600, until: t + 180};
}

function render(box, state, timeline) {
  box.replaceChildren(
    h('section', {'aria-labelledby': 'r-jobs'}, h('h2', {id: 'r-jobs'}, 'Jobs at this event'), jobsTable(state.jobs)),
    h('section', {'aria-labelledby': 'r-gpus'}, h('h2', {id: 'r-gpus'}, 'GPUs at this event'), gpuTable(state.gpus)),
    gantt(asOfTime(timeline, state.time), {title: 'GPUs over time, as of this event', id: 'r-gantt'}),
    h('section', {'aria-labelledby': 'r-workers'}, h('h2', {id: 'r-workers'}, 'Workers at this event'), workersTable(state.workers)));
}

function table(labelledby, heads, rows) {
  return h('table', {'aria-labelledby': labelledby},
    h('thead', {}, h('tr', {}, heads.map((c) => h('th', {scope: 'col'}, c)))),
    h('tbody', {}, rows));
}

function jobsTable(jobs) {
  if (!jobs.length) return empty('No jobs then.');
  return table('r-jobs', ['Job', 'User', 'Status', 'GPUs', 'Node', 'Attempt', 'Why it waited'], jobs.map((j) => h('tr', {},
    h('td', {}, h('a', {href: `#/job/${j.job_id}`}, j.name || j.job_id)), h('td', {}, j.user),
    h('td', {}, h('span', {class: `badge ${j.status}`}, j.status)), h('td', {class: 'num'}, String(j.gpus)),
    h('td', {}, j.node || '—'), h('td', {class: 'num'}, String(j.attempt ?? 0)),
    h('td', {}, (j.reasons || []).map(reasonWords).join('; ') || '—'))));
}

function gpuTable(gpus) {
  if (!gpus.length) return empty('No GPU was held then.');
  return table('r-gpus', ['Node', 'GPU', 'Held by job', 'Attempt'], gpus.map((g) => h('tr', {},
    h('td', {}, g.node), h('td', {class: 'num'}, String(g.index)),
    h('td', {}, g.job_id ? h('a', {href: `#/job/${g.job_id}`}, g.job_id) : 'free'), h('td', {class: 'num'}, g.attempt ? String(g.attempt) : '—'))));
}

function workersTable(workers) {
  if (!workers.length) return empty('No workers then.');
  return table('r-workers', ['Worker', 'Status'], workers.map((w) => h('tr', {}, h('td', {}, w.name), h('td', {}, w.status))));
}
