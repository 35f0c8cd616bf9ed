// The page: sign-in, the views behind hash routes (#/jobs?status=pending is a link anyone
// can share), and the event stream every view reads its changes from.

import {ApiError, del, get, post} from './api.js';
import {announce, h} from './dom.js';
import {Live} from './live.js';
import * as gpus from './gpus.js';
import * as job from './job.js';
import * as jobs from './jobs.js';
import * as queue from './queue.js';
import * as replay from './replay.js';
import * as workers from './workers.js';

const VIEWS = {queue, jobs, job, workers, gpus, replay};
const main = document.getElementById('main');
const ctx = {me: null, live: null, view: null};
window.eventq = ctx;

function liveState(state, seq) {
  const words = {live: 'Live', connecting: 'Connecting…', reconnecting: `Reconnecting… as of event ${seq}`,
                 ended: `Signed out: as of event ${seq}`}[state];
  const region = document.getElementById('live');
  if (region.textContent !== words) region.textContent = words;
  region.dataset.state = state;
  document.getElementById('seq').textContent = seq ? `event ${seq}` : '';
  if (state === 'ended') {
    const live = ctx.live;
    whoAmI().then((me) => { if (!me && ctx.live === live) signedOut('Your session has ended.'); });
  }
}

async function whoAmI() {
  try {
    return await get('/api/queue/me');
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return null;
    throw e;
  }
}

/** Parse "#/jobs?status=pending" into ["jobs", URLSearchParams]. */
export function currentRoute() {
  const hash = location.hash.startsWith('#/') ? location.hash.slice(2) : 'queue';
  const [path, search = ''] = hash.split('?');
  const [name, ...rest] = path.split('/');
  const params = new URLSearchParams(search);
  if (rest.length) params.set('id', decodeURIComponent(rest.join('/')));
  return [VIEWS[name] ? name : 'queue', params];
}

function route() {
  if (!ctx.me || !location.hash.startsWith('#/') && location.hash !== '') return;
  const [name, params] = currentRoute();
  if (ctx.view) ctx.view.unmount();
  main.replaceChildren();
  for (const link of document.querySelectorAll('#nav a')) {
    const here = link.getAttribute('href') === `#/${name}`;
    if (here) link.setAttribute('aria-current', 'page'); else link.removeAttribute('aria-current');
  }
  ctx.view = VIEWS[name].mount(main, ctx, params);
}

/** Go to a view; replace=true keeps the browser's history to one entry (filters). */
ctx.go = (hash, replace = false) => {
  if (replace) { history.replaceState(null, '', hash); route(); } else location.hash = hash;
};

async function start(me) {
  ctx.me = me;
  ctx.admin = me.level === 'admin';
  ctx.lead = me.level === 'admin' || me.level === 'lead';
  for (const link of document.querySelectorAll('#nav [data-admin]')) link.hidden = !ctx.admin;
  document.getElementById('nav').hidden = false;
  document.getElementById('session').hidden = false;
  document.getElementById('who').textContent = `${me.user} (${me.level})`;
  ctx.live = new Live(liveState);
  await ctx.live.start();
  route();
}

function signedOut(message) {
  if (ctx.live) ctx.live.stop();
  if (ctx.view) ctx.view.unmount();
  ctx.me = ctx.view = ctx.live = null;
  document.getElementById('nav').hidden = true;
  document.getElementById('session').hidden = true;
  signInForm(message);
}

function signInForm(message) {
  const token = h('input', {id: 'token', type: 'password', autocomplete: 'current-password', required: true});
  const error = h('p', {class: 'error', role: 'alert'});
  const form = h('form', {class: 'signin', 'aria-labelledby': 'signin-title', onsubmit: async (e) => {
    e.preventDefault();
    try {
      await post('/api/session', {token: token.value});
      token.value = '';
      await start(await get('/api/queue/me'));
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401
        ? 'That token is not valid (revoked, or mistyped).' : `Could not sign in: ${err.message}`;
    }
  }},
  h('h1', {id: 'signin-title'}, 'Sign in'),
  message ? h('p', {}, message) : null,
  h('p', {}, 'Paste your eventq API token (', h('code', {}, 'eventq ui'),
    ' on the server prints a one-time sign-in link for its admin).'),
  h('label', {for: 'token'}, 'API token'), token, error,
  h('button', {type: 'submit'}, 'Sign in'));
  main.replaceChildren(form);
  token.focus();
}

/** A one-time sign-in link (#signin=CODE, what `eventq ui` prints): the code is sent once
 * and leaves the address bar and the history at once. False if it was refused. */
async function useCode() {
  const code = location.hash.match(/^#signin=([^&]+)/);
  if (!code) return true;
  history.replaceState(null, '', `${location.pathname}#/queue`);
  try {
    await post('/api/session', {code: decodeURIComponent(code[1])});
    return true;
  } catch (e) {
    if (ctx.me) signedOut('');
    signInForm('That sign-in link was already used or has expired: ask for another (eventq ui).');
    return false;
  }
}

async function enter() {
  if (!await useCode()) return;
  const me = await whoAmI();
  if (me) await start(me); else signInForm('');
}

async function boot() {
  document.getElementById('signout').addEventListener('click', async () => {
    const live = ctx.live;
    ctx.live = null;
    if (live) live.stop();
    try { await del('/api/session'); } catch (e) { /* the session may already be gone */ }
    if (location.hash.startsWith('#/')) history.replaceState(null, '', location.pathname);
    signedOut('You are signed out.');
    announce('Signed out');
  });
  window.addEventListener('hashchange', () => {
    if (location.hash.startsWith('#signin=')) enter(); else route();
  });
  await enter();
}

boot();
