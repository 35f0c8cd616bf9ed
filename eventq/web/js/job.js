// One job's story: its states and attempts in time, every reason it waited and for how
// long (the answer to "why did it wait 40 minutes?"), what it runs, and its output followed
// live. New events of the job arrive on the stream; its record is read again after each.

import {ApiError, get, post} from './api.js';
import {announce, duration, empty, h, jobLabel, when} from './dom.js';
import {follow} from './live.js';
import {TERMINAL, estimateWords, jobOf, reasonWords} from './rows.js';

const LOG_CAP = 512 * 1024;

export function mount(root, ctx, params) {
  const id = params.get('id');
  const view = {id, job: null, events: [], follow: null, attempt: null, stopped: false, busy: false, again: false};
  const head = h('div', {});
  const details = h('div', {});
  const timeline = h('section', {'aria-labelledby': 'timeline-title'}, h('h2', {id: 'timeline-title'}, 'Timeline'));
  const reasons = h('section', {'aria-labelledby': 'reasons-title'}, h('h2', {id: 'reasons-title'}, 'Reason history'));
  const logs = h('section', {'aria-labelledby': 'logs-title'});
  root.append(head, details, reasons, timeline, logs);
  const refresh = async () => {
    if (view.busy) { view.again = true; return; }
    view.busy = true;
    try {
      const [job, trail] = await Promise.all([get(`/api/jobs/${id}`), get(`/api/jobs/${id}/events`)]);
      view.job = job;
      view.events = trail.events;
      renderHead(head, job, ctx);
      renderDetails(details, job);
      renderTimeline(timeline, view.events);
      renderReasons(reasons, await reasonHistory(id, view.events), job);
      if (view.attempt === null || (job.attempt > view.attempt && view.followingLatest)) {
        view.followingLatest = true;
        followLogs(logs, view, Math.max(1, job.attempt));
      } else if (!logs.firstChild) followLogs(logs, view, view.attempt);
    } catch (e) {
      head.replaceChildren(h('h1', {}, `Job ${id}`), h('p', {class: 'error', role: 'alert'}, e.message));
    } finally {
      view.busy = false;
      if (view.again && !view.stopped) { view.again = false; refresh(); }
    }
  };
  const stop = ctx.live.subscribe((record) => { if (jobOf(record) === id) refresh(); });
  refresh();
  return {unmount: () => { stop(); view.stopped = true; if (view.follow) view.follow.stop(); }};
}

function renderHead(head, job, ctx) {
  const label = jobLabel(job);
  const mayAct = ctx.admin || job.user === ctx.me.user;
  const note = h('span', {class: 'note', 'aria-live': 'polite'});
  const act = (word, path) => h('button', {type: 'button', onclick: async () => {
    try { await post(path); announce(`${word} ${label}: done`); } catch (e) { note.textContent = e.message; }
  }}, word);
  head.replaceChildren(
    h('h1', {}, job.name || job.job_id, ' ', h('span', {class: `badge ${job.status}`}, job.status)),
    h('p', {class: 'sub'}, `Job ${job.job_id} by ${job.user}`, job.team ? ` (team ${job.team})` : ''),
    mayAct ? h('div', {class: 'buttons'},
      !TERMINAL.has(job.status) ? act('Cancel job', `/api/queue/${job.job_id}/cancel`) : null,
      job.status === 'failed' || job.status === 'cancelled' ? act('Retry job', `/api/queue/${job.job_id}/retry`) : null,
      note) : null);
}

function renderDetails(box, job) {
  const rows = [
    ['Command', Array.isArray(job.command) ? job.command.join(' ') : job.command],
    ['GPUs', `${job.gpus} wanted${job.allocated_gpus.length ? `; holds ${job.allocated_gpus.join(', ')}` : ''}`],
    ['Node', job.node || '—'], ['Attempt', `${job.attempt} of ${job.max_attempts}`],
    ['Priority', `${job.priority} (effective ${job.effective_priority})`],
    ['Submitted', when(job.queued_at)], ['Started', when(job.started_at)], ['Ended', when(job.completed_at)],
    ['Exit code', job.exit_code ?? '—'], ['Error', job.error || '—'],
  ];
  if (job.position !== undefined) rows.push(['Position', job.position ?? '—']);
  if (job.estimated_start !== undefined) {
    rows.push(['Estimated start', estimateWords(job) || 'unknown']);
  }
  if (job.reasons && job.reasons.length) rows.push(['Waits because', job.reasons.map(reasonWords).join('; ')]);
  box.replaceChildren(h('dl', {class: 'details'}, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])));
}

const EVENT_WORDS = {
  job_submitted: (b) => `submitted (${b.job.gpus ?? 1} GPU)` +
    (b.reasons ? `; waits: ${b.reasons.map(reasonWords).join('; ')}` : ''),
  job_ready: () => 'joined the queue',
  job_blocked: (b) => `blocked: ${b.reason}`, job_approved: () => 'approved', job_rejected: () => 'rejected',
  job_held: () => 'held', job_released: () => 'released',
  priority_changed: (b) => `priority set to ${b.priority_override ?? 'its level\u2019s'}`,
  job_reasons_changed: (b) => `waits: ${b.reasons.map(reasonWords).join('; ') || 'nothing'}`,
  gpus_allocated: (b) => `attempt ${b.attempt}: GPUs ${b.gpus.join(', ')} on ${b.node} allocated`,
  attempt_dispatched: (b) => `attempt ${b.attempt} sent to ${b.node}`,
  attempt_started: (b) => `attempt ${b.attempt} started (pid ${b.pid})`,
  attempt_stop_requested: (b) => `attempt ${b.attempt}: stop requested (${b.reason})`,
  attempt_ended: (b) => `attempt ${b.attempt} ended: ${b.outcome}${b.exit_code !== null && b.exit_code !== undefined ? `, exit ${b.exit_code}` : ''}${b.detail ? `, ${b.detail}` : ''}`,
  gpus_released: (b) => `attempt ${b.attempt}: GPUs ${b.gpus.join(', ')} released`,
  job_requeued: (b) => `requeued for attempt ${b.next_attempt}: ${b.reason}`,
  job_completed: () => 'completed', job_failed: (b) => `failed: ${b.reason}`, job_cancelled: () => 'cancelled',
};

function renderTimeline(box, events) {
  const title = box.firstChild;
  box.replaceChildren(title, h('table', {'aria-labelledby': 'timeline-title'},
    h('thead', {}, h('tr', {}, ['Event', 'Time', 'What happened', 'By'].map((c) => h('th', {scope: 'col'}, c)))),
    h('tbody', {}, events.map((e) => h('tr', {},
      h('td', {class: 'num'}, String(e.seq)), h('td', {}, when(e.time)),
      h('td', {}, (EVENT_WORDS[e.type] || (() => e.type.replace(/_/g, ' ')))(e.body)),
      h('td', {}, e.principal))))));
}

/** The server's reason history (GET /api/jobs/{id}/reasons), or the same read from the
 * job's own events where the server has no such route. */
async function reasonHistory(id, events) {
  try {
    return (await get(`/api/jobs/${id}/reasons`)).history;
  } catch (e) {
    if (!(e instanceof ApiError) || (e.status !== 404 && e.status !== 405)) throw e;
    return historyFromEvents(events);
  }
}

export function historyFromEvents(events) {
  const out = [];
  const open = (codes, detail, e) => {
    if (out.length && out[out.length - 1].until === null) out[out.length - 1].until = e.time;
    if (codes.length) out.push({codes, detail, from: e.time, until: null, seq: e.seq, event: e.type});
  };
  for (const e of events) {
    const b = e.body;
    if (e.type === 'job_reasons_changed' || (e.type === 'job_submitted' && b.reasons)) open(b.reasons.map((r) => r.code), b.reasons.map(reasonWords).join('; '), e);
    else if (e.type === 'job_blocked') open(['approval'], b.reason, e);
    else if (e.type === 'job_held') open(['held'], 'held', e);
    else if (['attempt_dispatched', 'job_ready', 'job_released', 'job_approved', 'job_cancelled',
      'job_rejected'].includes(e.type)) open([], '', e);
  }
  return out;
}

function renderReasons(box, history, job) {
  const title = box.firstChild;
  if (!history.length) {
    box.replaceChildren(title, empty('It never waited for anything but its turn.'));
    return;
  }
  const now = Date.now() / 1000;
  box.replaceChildren(title, h('table', {'aria-labelledby': 'reasons-title'},
    h('thead', {}, h('tr', {}, ['Reason', 'From', 'Until', 'For', 'Set by event', 'Ended by event'].map((c) => h('th', {scope: 'col'}, c)))),
    h('tbody', {}, history.map((r) => h('tr', {},
      h('td', {}, r.reasons && r.reasons.length ? r.reasons.map(reasonWords).join('; ') : r.detail || r.codes.join(', ')),
      h('td', {}, when(r.from)),
      h('td', {}, r.until === null ? (TERMINAL.has(job.status) ? '—' : 'still') : when(r.until)),
      h('td', {}, duration((r.until ?? (TERMINAL.has(job.status) ? job.completed_at ?? now : now)) - r.from)),
      h('td', {}, `${r.seq} (${r.event.replace(/_/g, ' ')})`),
      h('td', {}, r.until_seq ? `${r.until_seq} (${r.until_event.replace(/_/g, ' ')})` : '—'))))));
}

function followLogs(box, view, attempt) {
  if (view.follow) view.follow.stop();
  view.attempt = attempt;
  const job = view.job;
  const choose = h('select', {id: 'log-attempt', onchange: (e) => {
    view.followingLatest = +e.target.value === job.attempt;
    followLogs(box, view, +e.target.value);
  }}, Array.from({length: Math.max(1, job.attempt)}, (_, i) => h('option', {value: i + 1, selected: i + 1 === attempt}, `Attempt ${i + 1}`)));
  const state = h('p', {class: 'note', 'aria-live': 'polite'}, 'Following…');
  const panes = {stdout: h('pre', {role: 'log', tabindex: 0, 'aria-labelledby': 'out-title'}),
    stderr: h('pre', {role: 'log', tabindex: 0, 'aria-labelledby': 'err-title'})};
  box.replaceChildren(h('h2', {id: 'logs-title'}, 'Logs'),
    h('label', {for: 'log-attempt'}, 'Attempt'), choose, state,
    h('div', {class: 'logs'},
      h('div', {}, h('h3', {id: 'out-title'}, 'stdout'), panes.stdout),
      h('div', {}, h('h3', {id: 'err-title'}, 'stderr'), panes.stderr)));
  view.follow = follow(`/api/jobs/${job.job_id}/logs?follow=true&stream=all&attempt=${attempt}`, (frame) => {
    if (frame.event === 'log') {
      const chunk = JSON.parse(frame.data);
      const pane = panes[chunk.stream] || panes.stdout;
      pane.textContent = (pane.textContent + chunk.text).slice(-LOG_CAP);
      pane.scrollTop = pane.scrollHeight;
    } else if (frame.event === 'end') {
      state.textContent = endWords(JSON.parse(frame.data), view.job);
    } else if (frame.event === 'revoked') {
      state.textContent = 'Stopped: this session may no longer read these logs.';
    }
  });
  view.follow.done.then((status) => { if (status && status !== 200) state.textContent = `The logs could not be read (${status}).`; });
}

/** How a followed attempt ended. The end frame's status is the job's now, not the
 * attempt's: an earlier attempt of a job that went on is told as such, not as "completed". */
export function endWords(end, job) {
  const code = end.exit_code !== null && end.exit_code !== undefined ? `exit code ${end.exit_code}` : 'exit code unknown';
  if (job && job.attempt > end.attempt) return `Attempt ${end.attempt} ended, ${code}; the job went on to attempt ${job.attempt}.`;
  if (TERMINAL.has(end.status) || end.status === 'purged') return `Attempt ${end.attempt} ended: ${end.status}, ${code}.`;
  return `Attempt ${end.attempt} ended, ${code}; the job is ${end.status} again.`;
}
