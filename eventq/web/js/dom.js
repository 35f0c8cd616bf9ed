// Small helpers every view uses: build elements, format times, announce changes.

/** h('button', {type: 'button', onclick: f}, 'Save'): an element with props and children. */
export function h(tag, props = {}, ...children) {
  // 'svg:a' and 'svg:title' are the SVG elements of those names (plain 'a' is HTML's).
  const svg = SVG_TAGS.has(tag) || tag.startsWith('svg:');
  const name = tag.replace(/^svg:/, '');
  const el = svg ? document.createElementNS(SVG_NS, name) : document.createElement(name);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.setAttribute('class', value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (!svg && key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

const SVG_NS = 'http://www.w3.org/2000/svg';
const SVG_TAGS = new Set(['svg', 'g', 'rect', 'line', 'text', 'path']);

/** A local clock time (and the date when it is not today). */
export function when(epoch) {
  if (epoch === null || epoch === undefined) return '—';
  const d = new Date(epoch * 1000);
  const time = CLOCK.format(d);
  const today = new Date().toDateString() === d.toDateString();
  return today ? time : `${DATE.format(d)} ${time}`;
}

// One formatter each: toLocaleTimeString builds a new one per call, which costs a table
// of rows more than the rest of its rendering.
const CLOCK = new Intl.DateTimeFormat([], {hour: '2-digit', minute: '2-digit', second: '2-digit'});
const DATE = new Intl.DateTimeFormat([]);

/** 75 -> "1 min 15 s"; 5400 -> "1 h 30 min". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  const m = Math.floor((s % 3600) / 60);
  return `${Math.floor(s / 3600)} h${m ? ` ${m} min` : ''}`;
}

/** The page's one polite live region says what just happened. */
export function announce(text) {
  const region = document.getElementById('announce');
  if (region) region.textContent = text;
}

/** A heading and an optional paragraph explaining why there is nothing to show. */
export function empty(text) {
  return h('p', {class: 'empty'}, text);
}

/** The label of a job in buttons and links: its name, and its id when names repeat. */
export function jobLabel(row) {
  return row.name ? `${row.name} (${row.job_id})` : row.job_id;
}
