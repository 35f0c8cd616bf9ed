// The event stream (GET /api/events/stream), read with fetch so the page controls the
// resume: every reconnection sends Last-Event-ID, the seq of the last event applied, and
// the server sends what came after it, nothing missed and nothing twice. A stream the server
// ends (dropped, shut down, a network cut) is opened again with backoff; a revoked one ends
// the session. Nothing here polls: between events the page does nothing.

export class Live {
  constructor(onState) {
    this.lastSeq = 0;
    this.listeners = new Set();
    this.onState = onState;
    this.state = 'connecting';
    this.stopped = false;
    this.controller = null;
    this.backoff = 250;
  }

  /** fn(record) for each event from now on; returns the function that stops it. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Resolves once the stream is open (or its first attempt failed). */
  start(afterSeq = 0) {
    this.lastSeq = afterSeq;
    return new Promise((resolve) => { this.firstOpen = resolve; this.loop(); });
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  /** Cut the connection now (as a network would); it is opened again like after any cut. */
  drop() {
    if (this.controller) this.controller.abort();
  }

  setState(state) {
    this.state = state;
    this.onState(state, this.lastSeq);
  }

  async loop() {
    while (!this.stopped) {
      const ended = await this.once();
      if (this.firstOpen) { this.firstOpen(); this.firstOpen = null; }
      if (ended === 'revoked' || ended === 'unauthorized') { this.setState('ended'); return; }
      if (this.stopped) return;
      this.setState('reconnecting');
      await new Promise((r) => setTimeout(r, this.backoff));
      this.backoff = Math.min(this.backoff * 2, 5000);
    }
  }

  async once() {
    this.controller = new AbortController();
    const headers = {Accept: 'text/event-stream'};
    if (this.lastSeq) headers['Last-Event-ID'] = String(this.lastSeq);
    let resp;
    try {
      resp = await fetch('/api/events/stream', {headers, credentials: 'same-origin',
                                                 signal: this.controller.signal});
    } catch (e) {
      return 'network';
    }
    if (resp.status === 401) return 'unauthorized';
    if (!resp.ok || !resp.body) return 'refused';
    this.backoff = 250;
    this.setState('live');
    if (this.firstOpen) { this.firstOpen(); this.firstOpen = null; }
    try {
      return await this.read(resp.body.getReader());
    } catch (e) {
      return 'network';
    }
  }

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return 'closed';
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const frame = parseFrame(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (frame && this.deliver(frame) === 'revoked') return 'revoked';
      }
    }
  }

  deliver(frame) {
    if (frame.event === 'revoked') return 'revoked';
    if (frame.event === 'dropped' || frame.data === undefined) return null;
    const record = JSON.parse(frame.data);
    if (record.seq <= this.lastSeq) return null;
    this.lastSeq = record.seq;
    for (const fn of [...this.listeners]) {
      try { fn(record); } catch (e) { console.error('a view failed to apply an event', e); }
    }
    this.onState(this.state, this.lastSeq);
    return null;
  }
}

/** One SSE frame's fields (comments ignored). */
export function parseFrame(text) {
  const frame = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'data') frame.data = frame.data === undefined ? value : `${frame.data}\n${value}`;
    else frame[field] = value;
  }
  return Object.keys(frame).length ? frame : null;
}

/** Follow an SSE route other than the event stream (a job's logs): calls onFrame(frame)
 * for each, until the server ends it or stop() is called. */
export function follow(url, onFrame) {
  const controller = new AbortController();
  const done = (async () => {
    const resp = await fetch(url, {credentials: 'same-origin', signal: controller.signal});
    if (!resp.ok || !resp.body) return resp.status;
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done: finished} = await reader.read();
      if (finished) return 200;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const frame = parseFrame(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (frame) onFrame(frame);
      }
    }
  })().catch(() => 0);
  return {stop: () => controller.abort(), done};
}
