// A job row, evolved by the events of the log as the server's scheduler evolves a job:
// the same transitions, so a row the page holds says what the server would answer. Pure:
// (row, record) -> the new row, or the same row when the event changes nothing it shows.

import {when} from './dom.js';

export const TERMINAL = new Set(['completed', 'failed', 'cancelled', 'rejected']);
export const WAITING = new Set(['pending', 'waiting', 'blocked', 'held']);

/** A new row from a job_submitted record. */
export function rowOf(record) {
  const spec = record.body.job;
  const gated = (spec.depends_on && spec.depends_on.length) || (spec.begin_at && spec.begin_at > record.time);
  return {
    job_id: spec.job_id, name: spec.name || '', user: spec.user, team: spec.team ?? null,
    status: gated ? 'waiting' : 'pending',
    priority: spec.priority_override ?? spec.priority, gpus: spec.gpus ?? 1,
    allocated_gpus: [], node: null, attempt: 0, max_attempts: spec.max_attempts ?? 3,
    queued_at: record.time, started_at: null, completed_at: null, exit_code: null, error: null,
    reasons: record.body.reasons ?? [],
  };
}

const STEPS = {
  job_ready: (r) => ({...r, status: 'pending', reasons: []}),
  job_rejected: (r, b, t) => ({...r, status: 'rejected', reasons: b.reasons, completed_at: t}),
  job_blocked: (r, b) => ({...r, status: 'blocked', reasons: [{code: 'approval', detail: b.reason}]}),
  job_approved: (r) => ({...r, status: 'pending', reasons: []}),
  job_held: (r, b, t, seq) => ({...r, status: 'held', reasons: [{code: 'held', detail: `held since seq ${seq}`}]}),
  job_released: (r) => ({...r, status: 'pending', reasons: []}),
  priority_changed: (r, b) => ({...r, priority: b.priority_override ?? r.base_priority ?? r.priority}),
  job_reasons_changed: (r, b) => ({...r, reasons: b.reasons}),
  attempt_dispatched: (r, b, t) => ({...r, status: 'dispatched', attempt: b.attempt, node: b.node,
    allocated_gpus: b.gpus, started_at: t, reasons: [], position: undefined,
    estimated_start: undefined, estimate_note: undefined, estimate_basis: undefined, exit_code: null}),
  attempt_started: (r) => (r.status === 'dispatched' ? {...r, status: 'running'} : r),
  attempt_ended: (r, b) => ({...r, exit_code: b.exit_code ?? null}),
  job_requeued: (r, b) => ({...r, status: 'pending', node: null, allocated_gpus: [], error: b.reason, completed_at: null}),
  job_completed: (r, b, t) => ({...r, status: 'completed', completed_at: t}),
  job_failed: (r, b, t) => ({...r, status: 'failed', error: b.reason, completed_at: t}),
  job_cancelled: (r, b, t) => ({...r, status: 'cancelled', completed_at: t}),
};

/** The job id an event is about, if any. */
export function jobOf(record) {
  const b = record.body || {};
  return b.job_id || (b.job && b.job.job_id) || null;
}

export function evolve(row, record) {
  const step = STEPS[record.type];
  return step ? step(row, record.body, record.time, record.seq) : row;
}

/** Reasons in words: "waits for GPUs: needs 4, node local has 3 free". */
const CODE_WORDS = {
  priority: 'jobs ahead of it', global_limit: 'the queue is at its limit',
  user_limit: 'its user is at their limit', team_limit: 'its team is at its limit',
  local_limit: 'the local machine is at its limit', gpus: 'waits for GPUs',
  reserved: 'GPUs are held for a bigger job', no_worker: 'no worker fits it',
  dependency: 'waits for other jobs', dependency_failed: 'a job it needs did not complete',
  approval: 'waits for approval', begin_time: 'not before its begin time', held: 'held',
};

export function reasonWords(reason) {
  const words = CODE_WORDS[reason.code] || reason.code.replace(/_/g, ' ');
  return reason.detail ? `${words}: ${reason.detail}` : words;
}

/** When a waiting job should start and what that rests on, in words: "starts after job
 * train-a ends, its time limit is 14:20", or why no time can be given. */
export function estimateWords(row) {
  const basis = row.estimate_basis;
  const start = row.estimated_start;
  if (basis && basis.kind === 'job_ends') {
    const job = `job ${basis.name || basis.job_id}${basis.status === 'pending' ? ' (ahead of it in the queue)' : ''}`;
    if (basis.end === null || basis.end === undefined) {
      return basis.by ? `no estimate: ${job} ran past its ${BY_WORDS[basis.by]}`
        : `no estimate: ${job} has no time limit`;
    }
    const frees = basis.frees === 'slot' ? ' and frees a slot of its limit' : '';
    return `starts after ${job} ends${frees}, its ${BY_WORDS[basis.by]} is ${when(basis.end)}`;
  }
  if (basis && basis.kind === 'begin_at') return `starts no earlier than its begin time, ${when(start)}`;
  if (basis && basis.kind === 'gpus_free') return `starts about ${when(start)}: its GPUs are free`;
  if (start) return `starts about ${when(start)}`;
  if (row.estimate_note) return `start unknown: ${row.estimate_note}`;
  return '';
}

const BY_WORDS = {time_limit: 'time limit', estimated_runtime: 'estimated end'};
