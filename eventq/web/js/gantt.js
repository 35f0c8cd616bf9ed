// GPUs over time: one lane per node and GPU, a bar per attempt that held it, a "now" line;
// every bar is a link to its job (hover or focus tells who and when), and the same data is
// a table beside it for anyone who does not read charts. Pure: (timeline, options) -> DOM.

import {h, when} from './dom.js';

const LANE = 26;
const LABEL = 130;
const WIDTH = 960;
const AXIS = 24;
const PALETTE = ['#2563eb', '#16a34a', '#9333ea', '#c2410c', '#0e7490', '#be185d', '#4d7c0f', '#7c3aed', '#b45309', '#0f766e'];

export function colour(bar, by) {
  if (by === 'priority') {
    const p = bar.priority ?? 0;
    return p >= 30 ? '#b91c1c' : p >= 20 ? '#c2410c' : p >= 10 ? '#2563eb' : '#64748b';
  }
  let hash = 0;
  for (const c of bar.user || '') hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

function laneKey(node, gpu) { return `${node}/${gpu}`; }

/** The chart and its table: {lanes, bars, since, until, now}, colour by 'user' or 'priority'. */
export function gantt(data, {by = 'user', title = 'GPUs over time', id = 'gantt'} = {}) {
  const lanes = data.lanes;
  const row = new Map(lanes.map((l, i) => [laneKey(l.node, l.gpu), i]));
  const span = Math.max(1, data.until - data.since);
  const x = (t) => LABEL + ((Math.min(Math.max(t, data.since), data.until) - data.since) / span) * (WIDTH - LABEL - 8);
  const height = AXIS + lanes.length * LANE + 4;
  const info = h('p', {class: 'bar-info', id: `${id}-info`}, 'Hover over or focus a bar for its job, user and times.');
  const svg = h('svg', {viewBox: `0 0 ${WIDTH} ${height}`, role: 'group', 'aria-labelledby': `${id}-title`,
    'aria-describedby': `${id}-info`, class: 'gantt', width: '100%'});
  svg.append(...axis(data, x, height), ...lanes.map((l, i) => h('text', {x: 4, y: AXIS + i * LANE + 17, class: 'lane'}, `${l.node} GPU ${l.gpu}`)));
  for (const bar of data.bars) {
    if ((bar.end ?? data.until) < data.since || bar.start > data.until) continue;
    for (const gpu of bar.gpus) {
      const at = row.get(laneKey(bar.node, gpu));
      if (at === undefined) continue;
      svg.append(barLink(bar, gpu, at, x, data, by, info));
    }
  }
  if (data.now >= data.since && data.now <= data.until) {
    svg.append(h('line', {x1: x(data.now), x2: x(data.now), y1: AXIS - 4, y2: height, class: 'now'}),
      h('text', {x: x(data.now) + 3, y: AXIS - 8, class: 'now-label'}, 'now'));
  }
  return h('figure', {class: 'gantt-figure'},
    h('figcaption', {id: `${id}-title`}, title, ` (${when(data.since)} to ${when(data.until)})`),
    lanes.length ? svg : h('p', {}, 'No GPUs known.'), info, holdings(data, `${id}-table`, title));
}

function axis(data, x, height) {
  const out = [];
  const ticks = 6;
  for (let i = 0; i <= ticks; i++) {
    const t = data.since + ((data.until - data.since) * i) / ticks;
    out.push(h('line', {x1: x(t), x2: x(t), y1: AXIS - 4, y2: height, class: 'tick'}),
      h('text', {x: x(t), y: 12, class: 'tick-label', 'text-anchor': i === 0 ? 'start' : i === ticks ? 'end' : 'middle'},
        new Date(t * 1000).toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'})));
  }
  return out;
}

export function describe(bar) {
  const until = bar.end === null || bar.end === undefined ? 'now' : when(bar.end);
  return `${bar.name || bar.job_id} attempt ${bar.attempt} by ${bar.user ?? 'unknown'}, on ${bar.node} GPU ${bar.gpus.join(', ')}, ${when(bar.start)} to ${until}, ${bar.status}`;
}

function barLink(bar, gpu, at, x, data, by, info) {
  const end = bar.end ?? data.now;
  const left = x(bar.start);
  const width = Math.max(3, x(end) - left);
  const words = describe(bar);
  const show = () => { info.textContent = words; };
  return h('svg:a', {href: `#/job/${bar.job_id}`, 'aria-label': `Job ${words}`, class: 'bar',
    onmouseenter: show, onfocus: show},
  h('rect', {x: left, y: AXIS + at * LANE + 3, width, height: LANE - 6, rx: 3, fill: colour(bar, by),
    class: bar.end === null || bar.end === undefined ? 'open' : ''}),
  h('svg:title', {}, words));
}

function holdings(data, id, title) {
  const rows = [];
  for (const bar of data.bars) for (const gpu of bar.gpus) rows.push([bar, gpu]);
  rows.sort((a, b) => (a[0].node + a[1]).localeCompare(b[0].node + b[1]) || a[0].start - b[0].start);
  return h('table', {'aria-labelledby': id, class: 'holdings'},
    h('caption', {id}, `${title}: every attempt that held a GPU`),
    h('thead', {}, h('tr', {}, ['Node', 'GPU', 'Job', 'Attempt', 'User', 'Priority', 'From', 'Until', 'Status'].map((c) => h('th', {scope: 'col'}, c)))),
    h('tbody', {}, rows.map(([bar, gpu]) => h('tr', {},
      h('td', {}, bar.node), h('td', {class: 'num'}, String(gpu)),
      h('td', {}, h('a', {href: `#/job/${bar.job_id}`}, bar.name || bar.job_id)), h('td', {class: 'num'}, String(bar.attempt)),
      h('td', {}, bar.user ?? '—'), h('td', {class: 'num'}, String(bar.priority ?? '—')),
      h('td', {}, when(bar.start)), h('td', {}, bar.end === null || bar.end === undefined ? 'now' : when(bar.end)),
      h('td', {}, bar.status)))));
}
