// Workers (admins): counts by state, every worker's GPUs, jobs and labels, and Add worker
// (its token shown once, with the commands that start eventq's agent or SimpleTuner's),
// Drain, Rotate token, Remove. The list is read again when an event changes a worker.

import {del, get, post} from './api.js';
import {announce, empty, h, when} from './dom.js';

const WORKER_EVENTS = new Set(['worker_created', 'worker_token_rotated', 'worker_connected',
  'worker_draining', 'worker_lost', 'worker_removed', 'attempt_dispatched', 'attempt_ended',
  'gpus_released', 'node_inventory_reported']);
// Every status the server gives a worker: a card each, so the cards add up to Total.
const STATES = ['connecting', 'idle', 'busy', 'draining', 'offline'];

export function mount(root, ctx) {
  root.append(h('h1', {}, 'Workers'));
  if (!ctx.admin) {
    root.append(empty('Only admins see and manage workers.'));
    return {unmount: () => {}};
  }
  const counts = h('dl', {class: 'cards'});
  const list = h('section', {'aria-labelledby': 'workers-title'}, h('h2', {id: 'workers-title'}, 'Every worker'));
  const secret = h('section', {'aria-labelledby': 'secret-title', hidden: true, class: 'secret'});
  const view = {busy: false, again: false};
  const refresh = async () => {
    if (view.busy) { view.again = true; return; }
    view.busy = true;
    try {
      const {workers} = await get('/api/admin/workers');
      renderCounts(counts, workers);
      renderList(list, workers, secret, refresh);
    } finally {
      view.busy = false;
      if (view.again) { view.again = false; refresh(); }
    }
  };
  root.append(counts, addForm(secret, refresh), secret, list);
  const stop = ctx.live.subscribe((record) => { if (WORKER_EVENTS.has(record.type)) refresh(); });
  refresh();
  return {unmount: stop};
}

function renderCounts(box, workers) {
  const by = (s) => workers.filter((w) => w.status === s).length;
  box.replaceChildren(...[['Total', workers.length], ...STATES.map((s) => [s[0].toUpperCase() + s.slice(1), by(s)])]
    .map(([k, v]) => h('div', {class: 'card'}, h('dt', {}, k), h('dd', {}, String(v)))));
}

function addForm(secret, refresh) {
  const error = h('p', {class: 'error', role: 'alert'});
  return h('form', {'aria-labelledby': 'add-title', class: 'add-worker', onsubmit: async (e) => {
    e.preventDefault();
    const f = e.target.elements;
    const labels = {};
    for (const pair of f['w-labels'].value.split(',').map((s) => s.trim()).filter(Boolean)) {
      const [k, ...v] = pair.split('=');
      labels[k.trim()] = v.join('=').trim();
    }
    try {
      const made = await post('/api/admin/workers', {name: f['w-name'].value.trim(),
        worker_type: f['w-type'].value, labels});
      error.textContent = '';
      e.target.reset();
      showSecret(secret, `Worker ${made.name} added`, made);
      refresh();
    } catch (err) { error.textContent = err.message; }
  }},
  h('h2', {id: 'add-title'}, 'Add worker'),
  h('div', {class: 'fields'},
    h('label', {for: 'w-name'}, 'Name'), h('input', {id: 'w-name', required: true, maxlength: 200}),
    h('label', {for: 'w-type'}, 'Type'), h('select', {id: 'w-type'},
      h('option', {value: 'persistent'}, 'persistent'), h('option', {value: 'ephemeral'}, 'ephemeral (one job)')),
    h('label', {for: 'w-labels'}, 'Labels (key=value, …)'), h('input', {id: 'w-labels', placeholder: 'gpu_type=a100'})),
  h('button', {type: 'submit'}, 'Add worker'), error);
}

/** The token is shown here once: the server keeps only its hash. */
function showSecret(box, title, made) {
  const copy = (what, text) => {
    const done = h('span', {class: 'note', 'aria-live': 'polite'});
    return [h('button', {type: 'button', onclick: async () => {
      try { await navigator.clipboard.writeText(text); done.textContent = 'Copied.'; } catch (e) { done.textContent = 'Copy failed: select the text instead.'; }
    }}, `Copy ${what}`), done];
  };
  box.hidden = false;
  box.replaceChildren(
    h('h2', {id: 'secret-title', tabindex: -1}, title),
    h('p', {}, 'Its token is shown only now. Start it on its machine with one of these:'),
    h('h3', {}, 'eventq worker'), h('pre', {}, h('code', {}, made.connection_command)),
    ...copy('eventq worker command', made.connection_command),
    h('h3', {}, 'SimpleTuner\u2019s stock worker'), h('pre', {}, h('code', {}, made.stock_worker_command)),
    ...copy('SimpleTuner worker command', made.stock_worker_command),
    made.note ? h('p', {class: 'note'}, made.note) : null,
    h('button', {type: 'button', onclick: () => { box.hidden = true; box.replaceChildren(); }}, 'Done, hide the token'));
  box.querySelector('h2').focus();
  announce(title);
}

function renderList(box, workers, secret, refresh) {
  const title = box.firstChild;
  if (!workers.length) { box.replaceChildren(title, empty('No workers yet: add one above.')); return; }
  box.replaceChildren(title, h('table', {'aria-labelledby': 'workers-title'},
    h('thead', {}, h('tr', {}, ['Worker', 'Status', 'Labels', 'GPUs', 'Current jobs', 'Last seen', 'Actions'].map((c) => h('th', {scope: 'col'}, c)))),
    h('tbody', {}, workers.map((w) => workerRow(w, secret, refresh)))));
}

function workerRow(w, secret, refresh) {
  const note = h('span', {class: 'note', 'aria-live': 'polite'});
  const act = (word, run) => h('button', {type: 'button', onclick: async () => {
    try { await run(); refresh(); } catch (e) { note.textContent = e.message; }
  }}, word, h('span', {class: 'visually-hidden'}, ` ${w.name}`));
  const offline = w.status === 'offline';
  return h('tr', {},
    h('th', {scope: 'row'}, w.name, ' ', h('span', {class: 'id'}, w.worker_id), ' ', w.worker_type === 'ephemeral' ? '(ephemeral)' : ''),
    h('td', {}, h('span', {class: `badge ${w.status}`}, w.status), w.offline_reason ? ` ${w.offline_reason}` : ''),
    h('td', {}, Object.entries(w.labels).map(([k, v]) => `${k}=${v}`).join(', ') || '—'),
    h('td', {}, w.gpus.length ? w.gpus.map((g) => `${g.index}: ${g.name} ${g.memory_gb} GB`).join('; ') + (w.simulated ? ' (simulated)' : '') : '—'),
    h('td', {}, w.current_jobs.length ? w.current_jobs.map((id, i) => [i ? ', ' : '', h('a', {href: `#/job/${id}`}, id)]) : '—'),
    h('td', {}, w.last_seen ? when(w.last_seen) : (w.connected ? 'connected now' : '—')),
    h('td', {class: 'actions'},
      !offline && w.status !== 'draining' ? act('Drain', () => post(`/api/admin/workers/${w.worker_id}/drain`)) : null,
      act('Rotate token', async () => {
        const made = await post(`/api/admin/workers/${w.worker_id}/token`);
        showSecret(secret, `New token for ${w.name}`, made);
      }),
      act('Remove', async () => {
        const force = !offline;
        if (force && !window.confirm(`${w.name} is ${w.status}: removing it now fails its running jobs (they are requeued). Remove it?`)) return;
        await del(`/api/admin/workers/${w.worker_id}${force ? '?force=true' : ''}`);
        announce(`Worker ${w.name} removed`);
      }),
      note));
}
