// The queue panel (seed 000's): counts, by status and by user, and for admins the limits,
// Process queue, Cleanup and the jobs waiting for approval. Its figures come from the
// server (GET /api/queue/stats) again when an event changes them: never on a timer.

import {get, post, query} from './api.js';
import {announce, duration, empty, h, jobLabel} from './dom.js';
import {reasonWords} from './rows.js';

const QUIET = new Set(['stale_report_ignored', 'token_issued', 'server_started']);

export function mount(root, ctx) {
  const view = {busy: false, again: false, limitsKey: '', blockedKey: ''};
  const stats = h('div', {class: 'panel'});
  const admin = h('div', {class: 'admin'});
  root.append(h('h1', {}, 'Queue'), stats, admin);
  const refresh = async () => {
    if (view.busy) { view.again = true; return; }
    view.busy = true;
    try {
      const [s, limits, blocked] = await Promise.all([
        get('/api/queue/stats'), ctx.admin ? get('/api/queue/concurrency') : null,
        ctx.admin ? get('/api/queue' + query({status: 'blocked', limit: 200})) : null]);
      renderStats(stats, s);
      if (ctx.admin) renderAdmin(admin, view, limits, blocked.jobs, refresh);
    } finally {
      view.busy = false;
      if (view.again) { view.again = false; refresh(); }
    }
  };
  const stop = ctx.live.subscribe((record) => { if (!QUIET.has(record.type)) refresh(); });
  refresh();
  return {unmount: stop};
}

function renderStats(box, s) {
  box.replaceChildren(
    h('dl', {class: 'cards'},
      card('Queued', s.queue_depth), card('Running', s.running),
      card('Max concurrent', s.max_concurrent), card('Avg wait', duration(s.avg_wait_seconds))),
    h('div', {class: 'columns'},
      countTable('Jobs by status', 'Status', s.by_status),
      countTable('Open jobs by user', 'User', s.by_user)));
}

/** Forms are rebuilt only when what they show changed and nobody is typing in them. */
function renderAdmin(box, view, limits, blocked, refresh) {
  if (!box.firstChild) {
    box.append(h('div', {class: 'slot-limits'}), queueActions(refresh), h('div', {class: 'slot-approvals'}));
  }
  const limitsKey = JSON.stringify(limits);
  const limitsSlot = box.querySelector('.slot-limits');
  if (limitsKey !== view.limitsKey && !limitsSlot.contains(document.activeElement)) {
    view.limitsKey = limitsKey;
    limitsSlot.replaceChildren(limitsForm(limits, refresh));
  }
  const blockedKey = blocked.map((j) => j.job_id).join(',');
  if (blockedKey !== view.blockedKey) {
    view.blockedKey = blockedKey;
    box.querySelector('.slot-approvals').replaceChildren(approvals(blocked, refresh));
  }
}

function card(label, value) {
  return h('div', {class: 'card'}, h('dt', {}, label), h('dd', {}, String(value)));
}

function countTable(title, what, counts) {
  const entries = Object.entries(counts).sort((a, b) => b[1] - a[1]);
  const id = `t-${title.replace(/\W+/g, '-').toLowerCase()}`;
  if (!entries.length) return h('section', {}, h('h2', {id}, title), empty('No jobs.'));
  return h('section', {},
    h('h2', {id}, title),
    h('table', {'aria-labelledby': id},
      h('thead', {}, h('tr', {}, h('th', {scope: 'col'}, what), h('th', {scope: 'col'}, 'Jobs'))),
      h('tbody', {}, entries.map(([k, v]) => h('tr', {}, h('th', {scope: 'row'}, k), h('td', {}, String(v)))))));
}

function numberField(id, label, value, min = 1) {
  return [h('label', {for: id}, label),
    h('input', {id, type: 'number', min, step: 1, value: value ?? '', required: true})];
}

function limitsForm(limits, refresh) {
  const note = h('p', {class: 'note', 'aria-live': 'polite'});
  return h('form', {'aria-labelledby': 'limits-title', class: 'limits', onsubmit: async (e) => {
    e.preventDefault();
    const f = e.target.elements;
    try {
      await post('/api/queue/concurrency', {
        max_concurrent: +f['limit-max'].value, user_max_concurrent: +f['limit-user'].value,
        team_max_concurrent: +f['limit-team'].value, enable_fair_share: f['fair-share'].checked});
      announce('Limits saved');
      refresh();
    } catch (err) { note.textContent = err.message; }
  }},
  h('h2', {id: 'limits-title'}, 'Limits'),
  h('div', {class: 'fields'},
    ...numberField('limit-max', 'Max concurrent', limits.max_concurrent),
    ...numberField('limit-user', 'Per user', limits.user_max_concurrent),
    ...numberField('limit-team', 'Per team', limits.team_max_concurrent)),
  h('label', {class: 'check'}, h('input', {id: 'fair-share', type: 'checkbox', checked: limits.enable_fair_share}),
    ' Fair share (team limits)'),
  h('button', {type: 'submit'}, 'Save limits'), note);
}

function queueActions(refresh) {
  const note = h('p', {class: 'note', 'aria-live': 'polite'});
  const days = h('input', {id: 'cleanup-days', type: 'number', min: 1, max: 365, value: 30});
  return h('section', {'aria-labelledby': 'actions-title'},
    h('h2', {id: 'actions-title'}, 'Actions'),
    h('button', {type: 'button', onclick: async () => {
      try { const r = await post('/api/queue/process'); note.textContent = `Scheduling pass done: ${r.dispatched ?? 0} started.`; } catch (err) { note.textContent = err.message; }
    }}, 'Process queue'),
    h('span', {class: 'inline'}, h('label', {for: 'cleanup-days'}, 'Finished more than (days)'), days,
      h('button', {type: 'button', onclick: async () => {
        try {
          const r = await post(`/api/queue/cleanup?days=${encodeURIComponent(days.value)}`);
          note.textContent = `Cleaned up ${r.deleted} jobs.`;
          refresh();
        } catch (err) { note.textContent = err.message; }
      }}, 'Clean up')),
    note);
}

function approvals(blocked, refresh) {
  const title = h('h2', {id: 'approvals-title'}, 'Waiting for approval');
  if (!blocked.length) return h('section', {}, title, empty('No job waits for approval.'));
  return h('section', {}, title,
    h('table', {'aria-labelledby': 'approvals-title'},
      h('thead', {}, h('tr', {}, ['Job', 'User', 'GPUs', 'Why', 'Decision'].map((c) => h('th', {scope: 'col'}, c)))),
      h('tbody', {}, blocked.map((job) => approvalRow(job, refresh)))));
}

function approvalRow(job, refresh) {
  const label = jobLabel(job);
  const reason = h('input', {type: 'text', 'aria-label': `Reason for rejecting ${label}`, maxlength: 500});
  const note = h('span', {class: 'note', 'aria-live': 'polite'});
  const act = (path) => async () => {
    try { await post(path); announce(`${label}: done`); refresh(); } catch (err) { note.textContent = err.message; }
  };
  return h('tr', {},
    h('td', {}, h('a', {href: `#/job/${job.job_id}`}, label)), h('td', {}, job.user), h('td', {}, String(job.gpus)),
    h('td', {}, (job.reasons || []).map(reasonWords).join('; ')),
    h('td', {class: 'actions'},
      h('button', {type: 'button', onclick: act(`/api/queue/${job.job_id}/approve`)}, 'Approve', h('span', {class: 'visually-hidden'}, ` ${label}`)),
      reason,
      h('button', {type: 'button', onclick: () => {
        if (!reason.value.trim()) { note.textContent = 'A reason is required to reject.'; reason.focus(); return; }
        act(`/api/queue/${job.job_id}/reject?reason=${encodeURIComponent(reason.value.trim())}`)();
      }}, 'Reject', h('span', {class: 'visually-hidden'}, ` ${label}`)),
      note));
}
