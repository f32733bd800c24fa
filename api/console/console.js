// clinflow console (issue 36): one ES module, no framework, no build step,
// nothing fetched from anywhere but this api.
//
// Rules this file keeps (docs/console.md):
// - The page's CSP allows no inline script or style: no `on…=` attributes,
//   no style attributes (CSSOM `el.style.x` only for the popup's position).
// - API data (note text, names, reasons) reaches the DOM only through
//   `textContent` and `createElement`, never `innerHTML`.
// - A patient reference lives in memory and in the page's DOM only: never in
//   the URL (routes are fixed hash fragments), the title, or browser storage.
// - Every request sends the CSRF cookie's value in `X-CSRF-Token`.

const CSRF_COOKIE = '__Host-clinflow-csrf';
const SESSION_PATH = '/v1/auth/session';
/** Notes rendered with their text at once, and per "Load more". */
const NOTES_PAGE = 10;
/** Document summaries asked per request (ids and dates only, no text). */
const SUMMARY_PAGE = 1000;
/** Client-side margin before the server's idle timeout (its touch is coarse). */
const IDLE_MARGIN_MS = 5000;

const $ = (id) => document.getElementById(id);

/** The timings the browser test reads (ids only, never a patient reference). */
const timings = { patientOpen: null, patientOpens: [], patientOpenPainted: null, noteRender: {}, notePainted: {} };

/** Milliseconds from `started` to the next frame's paint (after the DOM work measured). */
function afterPaint(started, record) {
  requestAnimationFrame(() => setTimeout(() => record(Math.round((performance.now() - started) * 1000) / 1000), 0));
}
window.clinflowTimings = timings;

// ---------------------------------------------------------------- DOM helpers

/**
 * createElement with properties: `class`, `text`, `data` (dataset), `attrs`
 * (setAttribute; never `style`), and children (nodes or strings, as text).
 */
function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'data') Object.assign(node.dataset, value);
    else if (key === 'attrs') for (const [a, v] of Object.entries(value)) { if (v !== undefined && v !== null) node.setAttribute(a, v); }
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(headers, rows, className = '') {
  const head = el('tr', {}, headers.map((h) => {
    const [label, cls] = Array.isArray(h) ? h : [h, undefined];
    return el('th', { class: cls, attrs: { scope: 'col' }, text: label });
  }));
  const body = el('tbody');
  const frag = document.createDocumentFragment();
  for (const row of rows) frag.append(row);
  body.append(frag);
  return el('div', { class: 'table-wrap' }, [el('table', { class: className }, [el('thead', {}, [head]), body])]);
}

function td(content, cls) {
  return el('td', { class: cls }, [content ?? '']);
}

function badge(text, kind) {
  return el('span', { class: `badge badge-${kind}`, text });
}

const pad = (n) => String(n).padStart(2, '0');

/** `YYYY-MM-DD HH:MM` in local time, or the input when it is no date. */
function dateTime(value) {
  if (!value) return '';
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function clock(value) {
  const d = new Date(value);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function localDate(value) {
  return dateTime(value).slice(0, 10);
}

const count = (n, one, many = `${one}s`) => `${n.toLocaleString('en')} ${n === 1 ? one : many}`;

function setAlert(id, message) {
  $(id).textContent = message || '';
}

function busy(button, on) {
  if (!button) return;
  button.disabled = on;
  if (on) button.setAttribute('aria-busy', 'true');
  else button.removeAttribute('aria-busy');
}

// ---------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function csrfToken() {
  for (const part of document.cookie.split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === CSRF_COOKIE) return part.slice(eq + 1).trim();
  }
  return '';
}

/** What the console says for a code, where the API's message is for developers. */
const FRIENDLY = {
  out_of_scope: 'This patient is not in your care teams.',
  invalid_credentials: 'Wrong username or password.',
  wrong_password: 'That password is not yours. Each wrong password counts toward your account lockout.',
  csrf_token: 'Your session could not be confirmed. Reload the page and sign in again.',
  forbidden: 'Your role may not do this.',
  not_found: 'Not found.',
};

function friendly(err) {
  if (err instanceof ApiError && err.code === 'stale') return '';
  if (!(err instanceof ApiError)) return 'Something went wrong in the console. Reload the page.';
  let message = FRIENDLY[err.code] || err.message || `The server answered ${err.status}.`;
  if (err.retryAfter) message += ` Retry in ${err.retryAfter} s.`;
  return message;
}

/**
 * One call to this api. Throws ApiError (status 0 when the server was not
 * reached). A 401 on anything but a login ends the console's session.
 */
async function api(method, path, body) {
  const epoch = sessionEpoch;
  const headers = { Accept: 'application/json' };
  const token = csrfToken();
  if (token) headers['X-CSRF-Token'] = token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
      redirect: 'error',
    });
  } catch {
    throw new ApiError(0, 'network', 'The server could not be reached. Check the connection and try again.');
  }
  const isLogin = method === 'POST' && path === SESSION_PATH;
  // An answer to a session that ended meanwhile is dropped unread.
  if (epoch !== sessionEpoch && !isLogin) throw new ApiError(0, 'stale', '');
  // A 401 is the session gone (a login's is a wrong password); any other
  // answer passed the guard, which counts it as activity.
  if (response.status === 401 && !isLogin) sessionLost('Your session has ended. Sign in again.');
  else if (!isLogin) idle.touch();
  if (response.status === 204) return null;
  let data = null;
  const type = response.headers.get('content-type') || '';
  if (type.includes('json')) {
    try { data = await response.json(); } catch { data = null; }
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    throw new ApiError(response.status, error.code || 'http_' + response.status, error.message || '', response.headers.get('retry-after'));
  }
  return data;
}

// ------------------------------------------------------------ session, idle

/** Bumped when a session ends: answers to its requests are dropped. */
let sessionEpoch = 0;

const state = {
  session: null,
  /** The open patient: { ref, summaries, rendered, nextCursor, generation }. */
  patient: null,
  patientGeneration: 0,
  /** A reference refused as out of scope, offered for break-glass. */
  refusedRef: null,
  emphCui: null,
  conceptQuery: null,
  auditQuery: null,
  disclosureQuery: null,
  modelVersions: [],
};

const idle = {
  timeoutMs: 0,
  last: 0,
  timer: 0,
  warned: false,
  touch() {
    this.last = Date.now();
    if (this.warned) {
      this.warned = false;
      if ($('idle-dialog').open) $('idle-dialog').close();
    }
  },
  start(seconds) {
    this.timeoutMs = Math.max(30, Number(seconds) || 900) * 1000;
    this.last = Date.now();
    this.warned = false;
    clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), 1000);
  },
  stop() {
    clearInterval(this.timer);
    this.timer = 0;
    this.warned = false;
    if ($('idle-dialog').open) $('idle-dialog').close();
  },
  /** Warn two minutes before the end, or at 80 % of a short timeout. */
  warnAfterMs() {
    return Math.max(this.timeoutMs - 120_000, this.timeoutMs * 0.8);
  },
  tick() {
    const quiet = Date.now() - this.last;
    const end = this.timeoutMs - IDLE_MARGIN_MS;
    updateBanner();
    if (quiet >= end) {
      const minutes = Math.round(this.timeoutMs / 60000);
      this.stop();
      signOut(`Signed out after ${count(minutes, 'minute')} idle.`);
      return;
    }
    if (quiet >= this.warnAfterMs()) {
      const left = Math.max(0, Math.ceil((end - quiet) / 1000));
      $('idle-countdown').textContent = `${Math.floor(left / 60)}:${pad(left % 60)}`;
      if (!this.warned) {
        this.warned = true;
        const dialog = $('idle-dialog');
        if (!dialog.open) dialog.showModal();
        $('idle-stay').focus();
      }
    }
  },
};

function updateBanner() {
  const banner = $('banner-break-glass');
  const now = Date.now();
  const grants = (state.session?.break_glass || []).filter((g) => new Date(g.expires_at).getTime() > now);
  if (!state.session || grants.length === 0) {
    if (!banner.hidden) { banner.hidden = true; banner.textContent = ''; }
    document.body.classList.remove('has-banner');
    return;
  }
  document.body.classList.add('has-banner');
  const until = grants.reduce((max, g) => Math.max(max, new Date(g.expires_at).getTime()), 0);
  let text = `Break-glass access active until ${clock(until)}`;
  if (grants.length > 1) text += ` (${grants.length} grants)`;
  text += '. Every read is recorded and reviewed.';
  if (banner.textContent !== text) banner.textContent = text;
  banner.hidden = false;
}

async function refreshSession() {
  state.session = await api('GET', SESSION_PATH);
  updateBanner();
  return state.session;
}

/** Drops every piece of patient data from the page and memory. */
function wipe() {
  sessionEpoch += 1;
  state.patient = null;
  state.patientGeneration += 1;
  state.refusedRef = null;
  state.emphCui = null;
  state.conceptQuery = null;
  state.auditQuery = null;
  state.disclosureQuery = null;
  hidePopup();
  spanInfo = new WeakMap();
  for (const id of ['notes-list', 'problems-body', 'patient-name', 'patient-summary', 'notes-count', 'concept-body',
    'concept-count', 'audit-body', 'audit-count', 'disclosure-body', 'disclosure-count', 'dead-body', 'dead-summary',
    'dead-result', 'ops-documents', 'ops-queues', 'ops-models', 'ops-updated', 'verify-result', 'reprocess-result']) {
    $(id).replaceChildren();
  }
  for (const id of ['patient-ref', 'bg-reason', 'bg-password', 'concept-cui', 'disclosure-ref', 'login-password',
    'password-current', 'password-new', 'password-confirm', 'audit-actor', 'audit-action', 'audit-resource-kind',
    'audit-resource-id', 'audit-from', 'audit-until']) {
    $(id).value = '';
  }
  $('audit-outcome').value = '';
  delete $('verify-result').dataset.intact;
  for (const id of ['patient-error', 'break-glass-error', 'concept-error', 'ops-error', 'audit-error', 'verify-error',
    'disclosure-error', 'reprocess-error', 'password-error']) {
    setAlert(id, '');
  }
  for (const id of ['patient', 'break-glass', 'concept-results', 'disclosure-results', 'notes-more', 'concept-next',
    'audit-next', 'disclosure-next']) {
    $(id).hidden = true;
  }
  $('patient-empty').hidden = false;
  $('concept-empty').hidden = false;
  $('disclosure-empty').hidden = false;
  $('problems-negated').checked = false;
}

function sessionLost(message) {
  if (!state.session) return;
  idle.stop();
  state.session = null;
  wipe();
  showLogin(message);
}

async function signOut(message) {
  idle.stop();
  const had = state.session;
  state.session = null;
  wipe();
  showLogin(message);
  if (had) {
    try { await api('POST', '/v1/auth/logout'); } catch { /* the session may be gone already */ }
  }
}

// ------------------------------------------------------------------- views

const VIEWS = {
  patients: { roles: ['clinician'], title: 'Patients' },
  concepts: { roles: ['clinician'], title: 'Concepts' },
  ops: { roles: ['ops'], title: 'Operations' },
  audit: { roles: ['auditor'], title: 'Audit trail' },
  disclosures: { roles: ['auditor', 'privacy_officer'], title: 'Disclosures' },
};
const DEFAULT_VIEW = { clinician: 'patients', ops: 'ops', auditor: 'audit', privacy_officer: 'disclosures' };

function showOnly(sectionId) {
  $('boot').hidden = true;
  for (const view of document.querySelectorAll('main > .view')) view.hidden = view.id !== sectionId;
}

function showLogin(notice) {
  $('nav').hidden = true;
  $('account').hidden = true;
  updateBanner();
  showOnly('view-login');
  document.title = 'Sign in · clinflow';
  $('login-notice').textContent = notice || '';
  setAlert('login-error', '');
  $('login-username').focus();
}

function showPasswordChange() {
  $('nav').hidden = true;
  showAccount();
  showOnly('view-password');
  document.title = 'Change password · clinflow';
  $('password-current').focus();
}

function showAccount() {
  $('account-user').textContent = state.session.username;
  $('account-role').textContent = state.session.role.replace('_', ' ');
  $('account').hidden = false;
}

function startApp() {
  showAccount();
  const role = state.session.role;
  for (const item of $('nav').querySelectorAll('li[data-roles]')) {
    item.hidden = !item.dataset.roles.split(' ').includes(role);
  }
  $('nav').hidden = !DEFAULT_VIEW[role];
  idle.start(state.session.idle_timeout_seconds);
  updateBanner();
  route(false);
}

/** Shows the view the hash names, if the role has it; else the role's first. */
function route(userNavigated) {
  if (!state.session || state.session.password_change_required) return;
  const role = state.session.role;
  let name = location.hash.slice(1);
  if (!VIEWS[name] || !VIEWS[name].roles.includes(role)) {
    name = DEFAULT_VIEW[role];
    if (name) history.replaceState(null, '', `#${name}`);
  }
  hidePopup();
  if (!name) {
    showOnly('view-none');
    document.title = 'clinflow console';
    return;
  }
  showOnly(`view-${name}`);
  document.title = `${VIEWS[name].title} · clinflow`;
  for (const link of $('nav').querySelectorAll('a')) {
    if (link.getAttribute('href') === `#${name}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  // Operators see fresh counts each time they come to the page.
  if (name === 'ops') loadOps();
  if (userNavigated) {
    const heading = $(`view-${name}`).querySelector('h1');
    heading.tabIndex = -1;
    heading.focus();
  } else if (name === 'patients' && !state.patient) {
    $('patient-ref').focus();
  }
}

// ------------------------------------------------------------ login, password

async function onLogin(event) {
  event.preventDefault();
  const username = $('login-username').value.trim();
  const password = $('login-password').value;
  setAlert('login-error', '');
  $('login-notice').textContent = '';
  if (!username || !password) {
    setAlert('login-error', 'Enter your username and password.');
    (username ? $('login-password') : $('login-username')).focus();
    return;
  }
  const button = $('login-submit');
  busy(button, true);
  try {
    const session = await api('POST', SESSION_PATH, { username, password });
    $('login-password').value = '';
    state.session = { break_glass: [], ...session };
    if (session.password_change_required) {
      showPasswordChange();
      return;
    }
    try { await refreshSession(); } catch { /* the login's answer will do */ }
    startApp();
  } catch (err) {
    setAlert('login-error', friendly(err));
    $('login-password').select();
    $('login-password').focus();
  } finally {
    busy(button, false);
  }
}

async function onPasswordChange(event) {
  event.preventDefault();
  setAlert('password-error', '');
  const current = $('password-current').value;
  const next = $('password-new').value;
  if (!current || !next) return setAlert('password-error', 'Fill in your current and new password.');
  if (next !== $('password-confirm').value) return setAlert('password-error', 'The new passwords differ.');
  try {
    await api('POST', '/v1/auth/password', { current_password: current, new_password: next });
  } catch (err) {
    return setAlert('password-error', friendly(err));
  }
  for (const id of ['password-current', 'password-new', 'password-confirm']) $(id).value = '';
  try {
    await refreshSession();
    startApp();
  } catch {
    state.session = null;
    showLogin('Password changed. Sign in with your new password.');
  }
}

// ------------------------------------------------------------- concept spans

const NEGATED = {
  presence: ['false', 'negated', 'absent', 'hypothetical'],
  negation: ['negated', 'true', 'yes'],
  status: ['hypothetical', 'other', "patient's relative"],
  experiencer: ['hypothetical', 'other', "patient's relative"],
};

/**
 * Whether MetaCAT marked the mention as not an affirmed finding, as the
 * server counts it for the problem list (clinflow::concepts::is_negated),
 * and how to say so.
 */
function polarity(annotation) {
  const meta = annotation.meta_anns && typeof annotation.meta_anns === 'object' ? annotation.meta_anns : {};
  for (const [task, result] of Object.entries(meta)) {
    const value = String(result && result.value !== undefined ? result.value : '').toLowerCase();
    const kind = task.toLowerCase();
    if (NEGATED[kind] && NEGATED[kind].includes(value)) {
      if (value === 'hypothetical') return { negated: true, label: 'Hypothetical' };
      if (kind === 'experiencer' || value === 'other' || value === "patient's relative") return { negated: true, label: 'Not the patient' };
      return { negated: true, label: 'Negated' };
    }
  }
  return { negated: false, label: 'Affirmed' };
}

/**
 * The spans to highlight: valid code-point ranges, by start (longest first on
 * a tie), each overlapping an earlier kept one skipped.
 */
function pickSpans(annotations, length) {
  const valid = annotations.filter((a) => Number.isInteger(a.start) && Number.isInteger(a.end)
    && a.start >= 0 && a.end > a.start && a.end <= length);
  valid.sort((a, b) => a.start - b.start || (b.end - b.start) - (a.end - a.start));
  const kept = [];
  let reach = 0;
  for (const a of valid) {
    if (a.start < reach) continue;
    kept.push(a);
    reach = a.end;
  }
  return kept;
}

/** Per highlighted element: its annotation and the model that made it. */
let spanInfo = new WeakMap();

/** The note's text with its concept spans, as a fragment (offsets in code points). */
function noteText(text, annotations, model) {
  const frag = document.createDocumentFragment();
  const points = Array.from(text);
  const spans = pickSpans(annotations || [], points.length);
  let pos = 0;
  let negated = 0;
  for (const a of spans) {
    if (a.start > pos) frag.append(points.slice(pos, a.start).join(''));
    const p = polarity(a);
    const mark = document.createElement('mark');
    mark.className = p.negated ? 'span negated' : 'span';
    mark.dataset.cui = a.cui;
    mark.dataset.start = a.start;
    mark.dataset.end = a.end;
    mark.tabIndex = 0;
    mark.textContent = points.slice(a.start, a.end).join('');
    if (state.emphCui && a.cui === state.emphCui) mark.classList.add('emph');
    spanInfo.set(mark, { annotation: a, polarity: p, model });
    frag.append(mark);
    pos = a.end;
    if (p.negated) negated += 1;
  }
  if (pos < points.length) frag.append(points.slice(pos).join(''));
  return { frag, spans: spans.length, negated };
}

// The one popup: filled and placed for the span hovered or focused.
let popupFor = null;
let popupHide = 0;

function showPopup(mark) {
  const info = spanInfo.get(mark);
  if (!info) return;
  clearTimeout(popupHide);
  if (popupFor && popupFor !== mark) popupFor.removeAttribute('aria-describedby');
  if (popupFor) popupFor.classList.remove('active');
  popupFor = mark;
  const { annotation, polarity: p, model } = info;
  $('popup-name').textContent = annotation.pretty_name || annotation.cui;
  $('popup-cui').textContent = annotation.cui;
  $('popup-polarity').textContent = p.label;
  $('popup-model').textContent = model || 'unknown';
  $('popup-acc').textContent = typeof annotation.acc === 'number' ? annotation.acc.toFixed(2) : '–';
  $('concept-popup').hidden = false;
  mark.setAttribute('aria-describedby', 'concept-popup');
  mark.classList.add('active');
  placePopup(mark);
}

/** Below the span, or above it when there is no room below. */
function placePopup(mark) {
  const popup = $('concept-popup');
  const rect = mark.getBoundingClientRect();
  const box = popup.getBoundingClientRect();
  let top = rect.bottom + 6;
  if (top + box.height > window.innerHeight - 8) top = Math.max(8, rect.top - box.height - 6);
  const left = Math.min(Math.max(8, rect.left), Math.max(8, window.innerWidth - box.width - 8));
  popup.style.top = `${Math.round(top)}px`;
  popup.style.left = `${Math.round(left)}px`;
}

function hidePopup() {
  clearTimeout(popupHide);
  const popup = $('concept-popup');
  if (popup) popup.hidden = true;
  if (popupFor) {
    popupFor.removeAttribute('aria-describedby');
    popupFor.classList.remove('active');
  }
  popupFor = null;
}

function hidePopupSoon() {
  clearTimeout(popupHide);
  popupHide = setTimeout(hidePopup, 150);
}

function wirePopup(container) {
  container.addEventListener('mouseover', (e) => {
    const mark = e.target.closest('mark.span');
    if (mark) showPopup(mark);
  });
  container.addEventListener('mouseout', (e) => {
    const mark = e.target.closest('mark.span');
    if (mark && !mark.contains(e.relatedTarget) && document.activeElement !== mark) hidePopupSoon();
  });
  container.addEventListener('focusin', (e) => {
    const mark = e.target.closest('mark.span');
    if (mark) showPopup(mark);
  });
  container.addEventListener('focusout', (e) => {
    if (e.target.closest('mark.span')) hidePopup();
  });
  const popup = $('concept-popup');
  popup.addEventListener('mouseover', () => clearTimeout(popupHide));
  popup.addEventListener('mouseleave', hidePopupSoon);
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape') hidePopup(); });
  // The popup is fixed: it follows its span when anything scrolls.
  window.addEventListener('scroll', () => { if (popupFor) placePopup(popupFor); }, { passive: true, capture: true });
  window.addEventListener('resize', () => { if (popupFor) placePopup(popupFor); }, { passive: true });
}

// ------------------------------------------------------------------ patient

const STATUS_BADGE = { done: 'ok', queued: 'neutral', processing: 'neutral', failed: 'bad' };

function noteShell(summary) {
  const article = el('article', {
    class: 'note',
    data: { documentId: summary.id },
    attrs: { 'aria-labelledby': `note-${summary.id}`, 'aria-busy': 'true' },
  });
  article.append(noteHead(summary, null), el('p', { class: 'note-loading', text: 'Loading note…' }));
  return article;
}

function noteHead(summary, doc, spans) {
  const date = summary.document_date || localDate(summary.created_at);
  const status = (doc && doc.status) || summary.status;
  const model = (doc && doc.model_version) || summary.model_version;
  const meta = el('p', { class: 'note-meta' }, [
    el('span', { text: `uploaded ${dateTime(summary.created_at)}` }),
    model ? el('span', { text: `model ${model}` }) : null,
    spans ? el('span', { text: spans.count ? `${count(spans.count, 'concept')}${spans.negated ? `, ${spans.negated} not affirmed` : ''}` : 'no concepts' }) : null,
    el('span', { class: 'mono', text: summary.id.slice(0, 8), attrs: { title: `Document ${summary.id}` } }),
  ]);
  return el('header', { class: 'note-head' }, [
    el('h4', { id: `note-${summary.id}`, text: `Note of ${date}` }),
    badge(status, STATUS_BADGE[status] || 'neutral'),
    meta,
  ]);
}

/** Fills a note's shell with its text and spans; times the DOM build. */
function renderNote(article, summary, doc) {
  const started = performance.now();
  const built = doc.text !== undefined && doc.text !== null
    ? noteText(doc.text, doc.annotations, doc.model_version)
    : null;
  const children = [noteHead(summary, doc, built ? { count: built.spans, negated: built.negated } : null)];
  if (doc.status === 'failed') {
    children.push(el('p', { class: 'note-loading', text: `Coding failed${doc.failure_code ? ` (${doc.failure_code})` : ''}; ops can replay it.` }));
  } else if (doc.status !== 'done') {
    children.push(el('p', { class: 'note-loading', text: 'Not coded yet: concepts appear once the pipeline has processed this note.' }));
  }
  if (built) {
    const body = el('div', { class: 'note-text' });
    body.append(built.frag);
    children.push(body);
  }
  article.replaceChildren(...children);
  article.removeAttribute('aria-busy');
  const ended = performance.now();
  timings.noteRender[doc.id] = Math.round((ended - started) * 1000) / 1000;
  performance.measure('note-render', { start: started, end: ended, detail: { docId: doc.id } });
  afterPaint(started, (ms) => { timings.notePainted[doc.id] = ms; });
}

function noteFailed(article, summary, err) {
  article.replaceChildren(noteHead(summary, null), el('p', { class: 'alert', text: `This note could not be read: ${friendly(err)}` }));
  article.removeAttribute('aria-busy');
}

/** Reads and renders the next page of notes (in parallel), in list order. */
async function renderNextNotes(p) {
  const page = p.summaries.slice(p.rendered, p.rendered + NOTES_PAGE);
  p.rendered += page.length;
  const frag = document.createDocumentFragment();
  const shells = page.map((s) => { const a = noteShell(s); frag.append(a); return a; });
  $('notes-list').append(frag);
  await Promise.all(page.map(async (summary, i) => {
    try {
      const doc = await api('GET', `/v1/documents/${encodeURIComponent(summary.id)}?include=text`);
      if (p.generation !== state.patientGeneration) return;
      renderNote(shells[i], summary, doc);
    } catch (err) {
      if (p.generation === state.patientGeneration) noteFailed(shells[i], summary, err);
    }
  }));
  updateNotesFooter(p);
}

function updateNotesFooter(p) {
  const total = p.nextCursor ? `${p.summaries.length}+` : String(p.summaries.length);
  $('notes-count').textContent = p.summaries.length === 0
    ? 'No notes for this patient.'
    : `Showing ${p.rendered} of ${total} notes.`;
  $('notes-more').hidden = !(p.rendered < p.summaries.length || p.nextCursor);
}

function renderProblems(items) {
  const body = $('problems-body');
  if (!items.length) {
    body.replaceChildren(el('p', { class: 'muted', text: 'No coded problems.' }));
    return;
  }
  const rows = items.map((c) => {
    const pressed = state.emphCui === c.cui;
    const name = el('button', {
      type: 'button',
      class: 'linklike concept-name',
      text: c.pretty_name || c.cui,
      data: { cui: c.cui },
      attrs: { 'aria-pressed': String(pressed), title: 'Outline its mentions in the notes' },
    });
    return el('tr', { data: { cui: c.cui } }, [
      el('td', {}, [name, el('div', { class: 'cui', text: `${c.cui} · ${count(c.mentions, 'mention')}` })]),
      td(String(c.documents), 'num'),
      td(el('div', {}, [c.last_date || '', c.first_date && c.first_date !== c.last_date ? el('div', { class: 'cui', text: c.first_date }) : null])),
    ]);
  });
  body.replaceChildren(table(['Concept', ['Notes', 'num'], 'Last / first'], rows, 'problem-table'));
  $('problem-list').scrollTop = 0;
}

function toggleEmphasis(cui) {
  state.emphCui = state.emphCui === cui ? null : cui;
  for (const mark of $('notes-list').querySelectorAll('mark.span.emph')) mark.classList.remove('emph');
  if (state.emphCui) {
    for (const mark of $('notes-list').querySelectorAll(`mark.span[data-cui="${CSS.escape(state.emphCui)}"]`)) mark.classList.add('emph');
  }
  for (const b of $('problems-body').querySelectorAll('button[data-cui]')) {
    b.setAttribute('aria-pressed', String(b.dataset.cui === state.emphCui));
  }
}

/**
 * Opens a patient: the documents list and the problem list in parallel,
 * then the newest notes in parallel. `patient-open` runs from the lookup to
 * the problem list and first notes in the DOM.
 */
async function openPatient(ref) {
  const generation = ++state.patientGeneration;
  const started = performance.now();
  timings.patientOpenPainted = null;
  performance.mark('patient-open-start');
  hidePopup();
  setAlert('patient-error', '');
  $('break-glass').hidden = true;
  state.refusedRef = null;
  const button = $('patient-open');
  busy(button, true);
  try {
    const [docs, problems] = await Promise.allSettled([
      api('POST', '/v1/patients/documents', { patient_ref: ref, limit: SUMMARY_PAGE }),
      api('POST', '/v1/patients/concepts', { patient_ref: ref }),
    ]);
    if (generation !== state.patientGeneration) return;
    const failed = docs.status === 'rejected' ? docs.reason : (problems.status === 'rejected' ? problems.reason : null);
    if (failed) {
      closePatient();
      if (failed instanceof ApiError && failed.code === 'out_of_scope') offerBreakGlass(ref);
      else setAlert('patient-error', friendly(failed));
      return;
    }
    const p = {
      ref,
      summaries: docs.value.items || [],
      nextCursor: docs.value.next_cursor || null,
      rendered: 0,
      generation,
      includeNegated: false,
    };
    state.patient = p;
    state.emphCui = null;
    $('patient-name').textContent = ref;
    const newest = p.summaries[0];
    const notes = p.nextCursor ? `${p.summaries.length}+ notes` : count(p.summaries.length, 'note');
    $('patient-summary').textContent = newest
      ? `${notes}, newest of ${newest.document_date || localDate(newest.created_at)}`
      : 'No notes yet';
    $('problems-negated').checked = false;
    renderProblems(problems.value.items || []);
    $('notes-list').replaceChildren();
    $('patient-empty').hidden = true;
    $('patient').hidden = false;
    await renderNextNotes(p);
    if (generation !== state.patientGeneration) return;
    const ended = performance.now();
    timings.patientOpen = Math.round(ended - started);
    timings.patientOpens.push(timings.patientOpen);
    performance.measure('patient-open', { start: started, end: ended });
    afterPaint(started, (ms) => { timings.patientOpenPainted = ms; });
  } finally {
    if (generation === state.patientGeneration) busy(button, false);
  }
}

function closePatient() {
  state.patient = null;
  $('patient').hidden = true;
  $('notes-list').replaceChildren();
  $('problems-body').replaceChildren();
  $('patient-name').textContent = '';
  $('patient-summary').textContent = '';
  $('patient-empty').hidden = false;
}

async function loadMoreNotes() {
  const p = state.patient;
  if (!p) return;
  const button = $('notes-more');
  busy(button, true);
  try {
    if (p.rendered >= p.summaries.length && p.nextCursor) {
      const more = await api('POST', '/v1/patients/documents', { patient_ref: p.ref, limit: SUMMARY_PAGE, after: p.nextCursor });
      if (p !== state.patient) return;
      p.summaries.push(...(more.items || []));
      p.nextCursor = more.next_cursor || null;
    }
    const first = p.rendered;
    await renderNextNotes(p);
    const next = $('notes-list').children[first];
    if (next) next.querySelector('h4')?.setAttribute('tabindex', '-1');
    next?.querySelector('h4')?.focus();
  } catch (err) {
    setAlert('patient-error', friendly(err));
  } finally {
    busy(button, false);
  }
}

async function reloadProblems() {
  const p = state.patient;
  if (!p) return;
  const includeNegated = $('problems-negated').checked;
  try {
    const problems = await api('POST', '/v1/patients/concepts', { patient_ref: p.ref, include_negated: includeNegated });
    if (p === state.patient) renderProblems(problems.items || []);
  } catch (err) {
    setAlert('patient-error', friendly(err));
  }
}

function onPatientSubmit(event) {
  event.preventDefault();
  const ref = $('patient-ref').value.trim();
  if (!ref) {
    setAlert('patient-error', 'Enter a patient reference.');
    $('patient-ref').focus();
    return;
  }
  openPatient(ref);
}

// -------------------------------------------------------------- break-glass

function offerBreakGlass(ref) {
  state.refusedRef = ref;
  setAlert('patient-error', 'This patient is not in your care teams, and you hold no break-glass grant for them.');
  setAlert('break-glass-error', '');
  $('bg-reason').value = '';
  $('bg-password').value = '';
  $('patient-empty').hidden = true;
  $('break-glass').hidden = false;
}

async function onBreakGlass(event) {
  event.preventDefault();
  const ref = state.refusedRef;
  if (!ref) return;
  setAlert('break-glass-error', '');
  const reason = $('bg-reason').value.trim();
  const password = $('bg-password').value;
  const length = Array.from(reason).length;
  if (length < 10 || length > 1000) {
    setAlert('break-glass-error', 'Give a reason of 10 to 1000 characters: say why you need this record.');
    $('bg-reason').focus();
    return;
  }
  if (!password) {
    setAlert('break-glass-error', 'Enter your password.');
    $('bg-password').focus();
    return;
  }
  const button = $('bg-submit');
  busy(button, true);
  try {
    const grant = await api('POST', '/v1/break-glass', { patient_ref: ref, reason, password });
    $('bg-password').value = '';
    $('bg-reason').value = '';
    $('break-glass').hidden = true;
    try {
      await refreshSession();
    } catch {
      state.session.break_glass = [...(state.session.break_glass || []), grant];
      updateBanner();
    }
    await openPatient(ref);
  } catch (err) {
    $('bg-password').value = '';
    setAlert('break-glass-error', friendly(err));
  } finally {
    busy(button, false);
  }
}

// -------------------------------------------------------------- concepts

async function searchConcept(after) {
  const cui = $('concept-cui').value.trim();
  const query = after ? state.conceptQuery : { cui };
  if (!query || !query.cui) {
    setAlert('concept-error', 'Enter a concept id, for example 49436004 (atrial fibrillation).');
    return;
  }
  if (!/^[A-Za-z0-9]{1,32}$/.test(query.cui)) {
    setAlert('concept-error', 'A concept id is 1 to 32 letters or digits.');
    return;
  }
  setAlert('concept-error', '');
  const params = new URLSearchParams({ limit: '100' });
  if (after) params.set('after', after);
  try {
    const page = await api('GET', `/v1/concepts/${encodeURIComponent(query.cui)}/patients?${params}`);
    state.conceptQuery = { cui: query.cui, next: page.next_cursor || null, page: after ? state.conceptQuery.page + 1 : 1 };
    const rows = (page.items || []).map((item) => {
      const open = el('button', { type: 'button', class: 'btn btn-small', text: 'Open', attrs: { 'aria-label': `Open patient ${item.patient_ref}` } });
      open.addEventListener('click', () => openFromConcept(item.patient_ref));
      return el('tr', { class: 'concept-row' }, [
        td(el('span', { class: 'patient-ref', text: item.patient_ref })),
        td(String(item.documents), 'num'),
        td(item.first_date || ''),
        td(item.last_date || ''),
        td(open),
      ]);
    });
    $('concept-empty').hidden = true;
    $('concept-results').hidden = false;
    $('concept-results-title').textContent = `Patients with concept ${query.cui}`;
    $('concept-body').replaceChildren(rows.length
      ? table(['Patient', ['Notes', 'num'], 'First seen', 'Last seen', 'Action'], rows)
      : el('p', { class: 'muted', text: 'None of your patients has this concept affirmed in a note.' }));
    $('concept-count').textContent = `${count(rows.length, 'patient')}${page.next_cursor ? ' on this page' : ''}`;
    $('concept-next').hidden = !page.next_cursor;
  } catch (err) {
    setAlert('concept-error', friendly(err));
  }
}

function openFromConcept(ref) {
  if (location.hash !== '#patients') {
    history.pushState(null, '', '#patients');
    route(false);
  }
  $('patient-ref').value = ref;
  openPatient(ref);
  $('patients-title').tabIndex = -1;
  $('patients-title').focus();
}

// -------------------------------------------------------------------- ops

async function loadOps() {
  setAlert('ops-error', '');
  const button = $('ops-refresh');
  busy(button, true);
  const [overview, dead] = await Promise.allSettled([api('GET', '/v1/ops/overview'), api('GET', '/v1/ops/dead-letters')]);
  busy(button, false);
  const errors = [];
  if (overview.status === 'fulfilled') renderOverview(overview.value);
  else errors.push(`Overview: ${friendly(overview.reason)}`);
  if (dead.status === 'fulfilled') renderDeadLetters(dead.value);
  else errors.push(`Dead letters: ${friendly(dead.reason)}`);
  setAlert('ops-error', errors.join(' '));
  $('ops-updated').textContent = `Updated ${new Date().toLocaleTimeString('en-GB')}`;
}

function renderOverview(o) {
  const tiles = Object.entries(o.documents || {}).map(([status, n]) => el('div', {
    class: `tile${status === 'failed' && n > 0 ? ' tile-bad' : ''}`,
    data: { status },
  }, [el('div', { class: 'tile-label', text: status }), el('div', { class: 'tile-value', text: Number(n).toLocaleString('en') })]));
  $('ops-documents').replaceChildren(...tiles);

  const queueRows = (o.queues || []).map((q) => {
    const dead = q.name.endsWith('.dead');
    const hot = dead && q.messages > 0;
    const name = el('span', { class: 'mono', text: q.name });
    return el('tr', { class: hot ? 'hot' : '', data: { queue: q.name } }, [
      td(hot ? el('span', {}, [name, ' ', badge('parked', 'bad')]) : name),
      td(Number(q.messages).toLocaleString('en'), 'num'),
      td(String(q.consumers), 'num'),
    ]);
  });
  $('ops-queues').replaceChildren(table(['Queue', ['Ready', 'num'], ['Consumers', 'num']], queueRows));

  const models = o.models || [];
  state.modelVersions = models.map((m) => m.model_version);
  $('ops-models').replaceChildren(models.length
    ? table(['Model version', ['Documents', 'num']], models.map((m) => el('tr', { data: { model: m.model_version } }, [
      td(el('span', { class: 'mono', text: m.model_version })),
      td(Number(m.documents).toLocaleString('en'), 'num'),
    ])))
    : el('p', { class: 'muted', text: 'No coded documents yet.' }));
  const select = $('rp-model-version');
  const chosen = select.value;
  select.replaceChildren(...state.modelVersions.map((v) => el('option', { value: v, text: v })));
  if (state.modelVersions.includes(chosen)) select.value = chosen;
}

function renderDeadLetters(listing) {
  const jobs = listing.jobs || [];
  const reasons = Object.entries(listing.by_reason || {});
  $('dead-summary').replaceChildren(
    count(listing.total || 0, 'parked job'),
    ...(reasons.length ? [' · ', ...reasons.flatMap(([r, n], i) => [i ? ' ' : '', badge(`${r} ${n}`, 'warn')])] : []),
  );
  $('dead-replay-all').disabled = jobs.length === 0;
  if (!jobs.length) {
    $('dead-body').replaceChildren(el('p', { class: 'muted', text: 'No dead letters. Every job was processed or is still on its lane.' }));
    return;
  }
  const rows = jobs.map((job) => {
    const id = job.document_id;
    const replay = el('button', {
      type: 'button',
      class: 'btn btn-small',
      text: 'Replay',
      disabled: !id,
      attrs: { 'aria-label': id ? `Replay document ${id}` : 'Replay (no document id)' },
      data: { documentId: id || '' },
    });
    replay.addEventListener('click', () => replayDead([id], replay));
    return el('tr', { class: 'dead-row', data: { documentId: id || '' } }, [
      td(job.lane),
      td(el('span', { class: 'mono', text: id || '(unreadable job)' })),
      td(badge(job.reason, 'warn')),
      td(String(job.attempts), 'num'),
      td(replay),
    ]);
  });
  $('dead-body').replaceChildren(table(['Lane', 'Document', 'Reason', ['Attempts', 'num'], 'Action'], rows));
}

async function replayDead(ids, button) {
  const all = ids === null;
  const ok = await confirmDialog(
    all ? 'Replay all dead letters?' : 'Replay this dead letter?',
    all
      ? 'Every parked job goes back on its lane and its document is queued again. Jobs of documents already done are dropped.'
      : `Document ${ids[0]} goes back on its lane and is queued again.`,
    'Replay',
  );
  if (!ok) { button?.focus(); return; }
  busy(button, true);
  try {
    const result = await api('POST', '/v1/ops/dead-letters/replay', all ? { all: true } : { ids });
    $('dead-result').textContent = `Replayed ${(result.replayed || []).length}, already done ${(result.already_done || []).length}, ${result.left} left.`;
    await loadOps();
    $('dead-title').tabIndex = -1;
    $('dead-title').focus();
  } catch (err) {
    setAlert('ops-error', friendly(err));
    busy(button, false);
  }
}

async function onReprocess(event) {
  event.preventDefault();
  setAlert('reprocess-error', '');
  const mode = document.querySelector('input[name="rp-mode"]:checked').value;
  let body;
  let what;
  if (mode === 'all') {
    body = { all: true };
    what = 'every document';
  } else if (mode === 'dates') {
    const from = $('rp-from').value;
    const until = $('rp-until').value;
    if (!from || !until || from >= until) return setAlert('reprocess-error', 'Give an upload date range: from a day, until a later day (exclusive).');
    body = { uploaded_from: from, uploaded_until: until };
    what = `documents uploaded from ${from} until ${until}`;
  } else {
    const model = $('rp-model-version').value;
    if (!model) return setAlert('reprocess-error', 'No model version to compare with yet.');
    body = { without_result_from: model };
    what = `documents without a result from ${model}`;
  }
  const ok = await confirmDialog('Reprocess documents?', `This sets ${what} back to queued and codes them again.`, 'Reprocess');
  if (!ok) return;
  try {
    const result = await api('POST', '/v1/ops/reprocess', body);
    $('reprocess-result').textContent = `Queued ${count(result.queued, 'document')}.`;
    loadOps();
  } catch (err) {
    setAlert('reprocess-error', friendly(err));
  }
}

// ------------------------------------------------------------------ audit

const ACTIONS = ['auth.login', 'auth.logout', 'auth.access', 'auth.break_glass', 'auth.lockout', 'auth.password_change',
  'auth.session', 'document.upload', 'document.read', 'document.process', 'document.status', 'document.purge',
  'patient.read', 'concept.read', 'patient.export', 'patient.erase', 'patient.erase_request', 'privacy.read',
  'privacy.consent_withdraw', 'audit.read', 'audit.verify', 'audit.disclosures', 'ops.overview',
  'ops.dead_letters.list', 'ops.dead_letters.replay', 'ops.reprocess', 'admin.read', 'admin.user', 'admin.team',
  'admin.api_key', 'admin.sessions.revoke', 'care_team.patient_add'];

const OUTCOME_BADGE = { success: 'ok', denied: 'bad', failure: 'warn' };

function actorCell(name, role, kind) {
  return el('div', {}, [
    el('span', { class: 'actor-name', text: name || `(${kind || 'unknown'})` }),
    role ? el('div', { class: 'muted', text: role.replace('_', ' ') }) : null,
  ]);
}

/** A long id (a patient's blind index) shortened, whole in its tooltip. */
function shortId(id, keep = 12) {
  if (!id || id.length <= 40) return el('span', { class: 'mono muted', text: id || '' });
  return el('span', { class: 'mono muted', text: `${id.slice(0, keep)}…`, attrs: { title: id } });
}

function resourceCell(kind, id) {
  if (!kind && !id) return '';
  return el('div', {}, [el('div', { text: kind || '' }), id ? shortId(id) : null]);
}

/** A reason without the break-glass grant it names (shown in its own column). */
function reasonText(reason) {
  return (reason || '').split(' ').filter((w) => !w.startsWith('break_glass:')).join(' ');
}

async function searchAudit(after) {
  setAlert('audit-error', '');
  let params;
  if (after) {
    params = new URLSearchParams(state.auditQuery.params);
    params.set('after', after);
  } else {
    params = new URLSearchParams();
    const fields = { actor: 'audit-actor', action: 'audit-action', outcome: 'audit-outcome', resource_kind: 'audit-resource-kind', resource_id: 'audit-resource-id' };
    for (const [name, id] of Object.entries(fields)) {
      const v = $(id).value.trim();
      if (v) params.set(name, v);
    }
    for (const [name, id] of [['from', 'audit-from'], ['until', 'audit-until']]) {
      const v = $(id).value;
      if (!v) continue;
      const d = new Date(v);
      if (Number.isNaN(d.getTime())) return setAlert('audit-error', `${name} is not a date and time.`);
      params.set(name, d.toISOString());
    }
    params.set('limit', '100');
  }
  const button = $('audit-search');
  busy(button, true);
  try {
    const page = await api('GET', `/v1/audit/events?${params}`);
    const base = new URLSearchParams(params);
    base.delete('after');
    state.auditQuery = { params: base.toString(), page: after ? state.auditQuery.page + 1 : 1 };
    const events = page.events || [];
    const rows = events.map((e) => el('tr', { class: 'event-row', data: { seq: e.seq, actor: e.actor_name || '', action: e.action, outcome: e.outcome, resourceId: e.resource_id || '' } }, [
      td(String(e.seq), 'num'),
      td(dateTime(e.occurred_at)),
      td(actorCell(e.actor_name, e.actor_role, e.actor_kind)),
      td(el('span', { class: 'mono', text: e.action })),
      td(badge(e.outcome, OUTCOME_BADGE[e.outcome] || 'neutral')),
      td(resourceCell(e.resource_kind, e.resource_id)),
      td(e.reason || ''),
      td(e.patients && e.patients.length ? String(e.patients.length) : '', 'num'),
      td(e.source_ip || ''),
    ]));
    $('audit-body').replaceChildren(rows.length
      ? table([['Seq', 'num'], 'Occurred', 'Actor', 'Action', 'Outcome', 'Resource', 'Reason', ['Patients', 'num'], 'Source'], rows, 'audit-table')
      : el('p', { class: 'muted', text: 'No events match these filters.' }));
    $('audit-count').textContent = `${count(events.length, 'event')}, oldest first${state.auditQuery.page > 1 ? `, page ${state.auditQuery.page}` : ''}.`;
    $('audit-next').hidden = !page.next_cursor;
    $('audit-next').dataset.after = page.next_cursor || '';
  } catch (err) {
    setAlert('audit-error', friendly(err));
  } finally {
    busy(button, false);
  }
}

async function verifyChain() {
  setAlert('verify-error', '');
  const button = $('verify-run');
  busy(button, true);
  $('verify-result').replaceChildren(el('p', { class: 'muted', text: 'Verifying every event’s signature and hash link…' }));
  try {
    const v = await api('POST', '/v1/audit/verify');
    const facts = [
      ['Events verified', Number(v.rows).toLocaleString('en')],
      ['Checkpoints', String(v.checkpoints)],
    ];
    if (v.newest_checkpoint !== undefined) facts.push(['Newest checkpoint', `seq ${v.newest_checkpoint}`]);
    if (v.broken_at !== undefined) facts.push(['Broken at', `seq ${v.broken_at}`]);
    if (v.problem) facts.push(['Problem', v.problem]);
    const result = $('verify-result');
    result.dataset.intact = String(Boolean(v.intact));
    result.replaceChildren(
      el('p', {}, [v.intact ? badge('Chain intact', 'ok') : badge('Chain broken', 'bad'), ` checked ${dateTime(new Date())}`]),
      el('div', { class: 'verify-grid' }, facts.map(([k, val]) => el('div', { class: 'tile' }, [
        el('div', { class: 'tile-label', text: k }), el('div', { class: 'tile-value-small', text: val }),
      ]))),
    );
  } catch (err) {
    $('verify-result').replaceChildren();
    setAlert('verify-error', friendly(err));
  } finally {
    busy(button, false);
  }
}

async function searchDisclosures(after) {
  setAlert('disclosure-error', '');
  const ref = after ? state.disclosureQuery.ref : $('disclosure-ref').value.trim();
  if (!ref) {
    setAlert('disclosure-error', 'Enter a patient reference.');
    $('disclosure-ref').focus();
    return;
  }
  const body = { patient_ref: ref, limit: 100 };
  if (after) body.after = Number(after);
  try {
    const page = await api('POST', '/v1/audit/disclosures', body);
    state.disclosureQuery = { ref, next: page.next_cursor ?? null, page: after ? state.disclosureQuery.page + 1 : 1 };
    const rows = (page.disclosures || []).map((d) => el('tr', {
      class: 'disclosure-row',
      data: { actor: d.actor_name || '', action: d.action, outcome: d.outcome, breakGlass: d.break_glass_grant ? 'true' : 'false' },
    }, [
      td(String(d.seq), 'num'),
      td(dateTime(d.occurred_at)),
      td(actorCell(d.actor_name, d.actor_role, d.actor_kind)),
      td(el('span', { class: 'mono', text: d.action })),
      td(badge(d.outcome, OUTCOME_BADGE[d.outcome] || 'neutral')),
      td(resourceCell(d.resource_kind, d.resource_id)),
      td(d.break_glass_grant
        ? el('div', {}, [badge('Break-glass', 'warn'), el('div', { class: 'mono muted', text: d.break_glass_grant.slice(0, 8), attrs: { title: `Grant ${d.break_glass_grant}` } })])
        : el('span', { class: 'muted', text: '–' })),
      td(reasonText(d.reason)),
      td(d.source_ip || ''),
    ]));
    $('disclosure-empty').hidden = true;
    $('disclosure-results').hidden = false;
    $('disclosure-body').replaceChildren(rows.length
      ? table([['Seq', 'num'], 'Occurred', 'Who', 'Action', 'Outcome', 'Resource', 'Grant', 'Reason', 'Source'], rows, 'audit-table')
      : el('p', { class: 'muted', text: 'No accesses to this patient are on the trail.' }));
    $('disclosure-count').textContent = `${count(rows.length, 'access', 'accesses')}, newest first${state.disclosureQuery.page > 1 ? `, page ${state.disclosureQuery.page}` : ''}.`;
    $('disclosure-next').hidden = page.next_cursor === undefined || page.next_cursor === null;
    $('disclosure-next').dataset.after = page.next_cursor ?? '';
  } catch (err) {
    setAlert('disclosure-error', friendly(err));
  }
}

// ---------------------------------------------------------------- dialogs

let confirmResolve = null;

/** A modal confirmation; resolves true on Confirm, false on Cancel or Escape. */
function confirmDialog(title, text, action) {
  const dialog = $('confirm-dialog');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = action;
  return new Promise((resolve) => {
    confirmResolve = resolve;
    dialog.showModal();
    $('confirm-cancel').focus();
  });
}

function settleConfirm(value) {
  const dialog = $('confirm-dialog');
  if (dialog.open) dialog.close();
  const resolve = confirmResolve;
  confirmResolve = null;
  if (resolve) resolve(value);
}

// ------------------------------------------------------------------- wiring

function wire() {
  $('login-form').addEventListener('submit', onLogin);
  $('password-form').addEventListener('submit', onPasswordChange);
  $('logout').addEventListener('click', () => signOut('Signed out.'));
  $('skip-link').addEventListener('click', (e) => {
    e.preventDefault();
    const target = document.querySelector('main > .view:not([hidden]) h1') || $('main');
    target.tabIndex = -1;
    target.focus();
  });
  window.addEventListener('hashchange', () => route(true));

  $('patient-form').addEventListener('submit', onPatientSubmit);
  $('notes-more').addEventListener('click', loadMoreNotes);
  $('problems-negated').addEventListener('change', reloadProblems);
  $('problems-body').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-cui]');
    if (b) toggleEmphasis(b.dataset.cui);
  });
  $('break-glass-form').addEventListener('submit', onBreakGlass);
  $('bg-cancel').addEventListener('click', () => {
    $('break-glass').hidden = true;
    $('bg-password').value = '';
    state.refusedRef = null;
    setAlert('patient-error', '');
    $('patient-empty').hidden = Boolean(state.patient);
    $('patient-ref').focus();
  });
  wirePopup($('notes-list'));

  $('concept-form').addEventListener('submit', (e) => { e.preventDefault(); searchConcept(null); });
  $('concept-next').addEventListener('click', () => searchConcept(state.conceptQuery?.next));

  $('ops-refresh').addEventListener('click', loadOps);
  $('dead-replay-all').addEventListener('click', () => replayDead(null, $('dead-replay-all')));
  $('reprocess-form').addEventListener('submit', onReprocess);

  const actions = $('audit-actions');
  actions.replaceChildren(...ACTIONS.map((a) => el('option', { value: a })));
  $('audit-form').addEventListener('submit', (e) => { e.preventDefault(); searchAudit(null); });
  $('audit-next').addEventListener('click', () => searchAudit($('audit-next').dataset.after));
  $('verify-run').addEventListener('click', verifyChain);
  $('disclosure-form').addEventListener('submit', (e) => { e.preventDefault(); searchDisclosures(null); });
  $('disclosure-next').addEventListener('click', () => searchDisclosures($('disclosure-next').dataset.after));

  $('idle-stay').addEventListener('click', async () => {
    try { await refreshSession(); } catch (err) { if (err.status !== 401) setAlert('patient-error', friendly(err)); }
  });
  $('idle-signout').addEventListener('click', () => signOut('Signed out.'));
  $('idle-dialog').addEventListener('cancel', (e) => {
    // Escape means "I am here".
    e.preventDefault();
    $('idle-stay').click();
  });
  $('confirm-ok').addEventListener('click', () => settleConfirm(true));
  $('confirm-cancel').addEventListener('click', () => settleConfirm(false));
  $('confirm-dialog').addEventListener('cancel', (e) => { e.preventDefault(); settleConfirm(false); });
}

async function boot() {
  wire();
  try {
    const session = await api('GET', SESSION_PATH);
    state.session = session;
    if (session.password_change_required) showPasswordChange();
    else startApp();
  } catch (err) {
    state.session = null;
    showLogin('');
    if (err.status !== 401 && !(err.status === 403 && err.code === 'csrf_token')) setAlert('login-error', friendly(err));
  }
}

boot();
