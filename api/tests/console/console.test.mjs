// The web console in a real headless browser (issue 36): Debian's chromium
// driven by playwright-core, checked with axe-core. api/tests/it/console.rs
// starts the real stack over HTTPS, seeds users and documents processed by
// MedCAT, writes a fixture JSON and runs `node console.test.mjs` with
// CONSOLE_FIXTURE naming it. The server's key is pinned
// (--ignore-certificate-errors-spki-list), not every certificate accepted.
//
// Steps (each fails with a message naming what it expected):
//   keyboard   alice signs in and opens a patient with Tab, typing and Enter only
//   clinician  highlighted spans = the API's offsets (code points), negated
//              styled apart, popup on hover and focus, problem list, no PHI in
//              URL/title/storage; "my patients with concept" opens the patient
//   timings    a 200-note patient and a 100-concept note (window.clinflowTimings)
//   outsider   bob is refused, breaks the glass, sees the banner and the notes
//   csrf       a request without X-CSRF-Token, and a forged cross-site form post
//   ops        olga sees the overview and replays a dead letter
//   negated    one answer rewritten in the browser (MedCAT here has no MetaCAT)
//   auditor    audrey filters the trail, verifies the chain, reads disclosures
//   idle       on an api with a 30 s idle timeout: the warning, then the sign-out
//   axe        no serious or critical violation on every page (others printed)
// Screenshots (1280x800) go to fixture.screenshots.
//
// Fixture fields: base, spki, password, users{clinician,outsider,ops,auditor},
// patient, cui, cui_name, expected{document_id, spans[{cui,start,end,negated}]},
// big_patient, dense{patient_ref, document_id, spans}, dead_letter_document,
// screenshots, timings_out, idle{base, timeout_seconds}. Env: CHROMIUM
// (default /usr/bin/chromium); CONSOLE_PATIENT_OPEN_LIMIT_MS (1000) and
// CONSOLE_NOTE_RENDER_LIMIT_MS (200), the targets the timings are reported
// against (a note, never a failure).

import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
const fixture = JSON.parse(readFileSync(process.env.CONSOLE_FIXTURE || fail('CONSOLE_FIXTURE is not set'), 'utf8'));
const AXE_SOURCE = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const OPEN_LIMIT_MS = Number(process.env.CONSOLE_PATIENT_OPEN_LIMIT_MS || 1000);
const RENDER_LIMIT_MS = Number(process.env.CONSOLE_NOTE_RENDER_LIMIT_MS || 200);
/** The audit trail is written asynchronously (outbox, broker, sink): poll it this long. */
const AUDIT_WAIT_MS = 60_000;
const { base, users, password } = fixture;
const refs = [fixture.patient, fixture.big_patient, fixture.dense.patient_ref];
mkdirSync(fixture.screenshots, { recursive: true });

function fail(message) {
  throw new Error(message);
}

function check(condition, message) {
  if (!condition) fail(message);
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// A hung browser must not hang the suite.
setTimeout(() => {
  console.error('console test: no result after 8 minutes');
  process.exit(1);
}, 8 * 60_000).unref();

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [`--ignore-certificate-errors-spki-list=${fixture.spki}`],
});

const failures = [];
const axeFindings = [];
let lastPage = null;

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, locale: 'en-GB' });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  lastPage = page;
  page.on('pageerror', (e) => failures.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // A CSP violation is a bug in the page (inline style or script).
    if (m.type() === 'error' && /Content Security Policy/i.test(m.text())) failures.push(`CSP violation: ${m.text()}`);
  });
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: join(fixture.screenshots, name) });
}

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failures.push(`${name}: ${e.message}`);
    console.log(`FAIL ${name}: ${e.stack || e.message}`);
    const file = `failure-${failures.length}.png`;
    await lastPage?.screenshot({ path: join(fixture.screenshots, file) }).then(() => console.log(`     screenshot ${file}`), () => {});
  }
}

// ---------------------------------------------------------------- helpers

async function gotoConsole(page) {
  await page.goto(`${base}/ui`);
  await page.locator('#login-username').waitFor({ state: 'visible' });
}

async function loginByForm(page, username) {
  await gotoConsole(page);
  await page.fill('#login-username', username);
  await page.fill('#login-password', password);
  await page.click('#login-submit');
  await signedIn(page, username);
}

async function signedIn(page, username) {
  await page.locator('#account').waitFor({ state: 'visible' });
  const shown = (await page.textContent('#account-user')).trim();
  check(shown === username, `signed in as "${shown}", expected "${username}"`);
}

/** Presses Tab (at most `max` times) until the element with `id` has focus. */
async function tabTo(page, id, max = 40) {
  for (let i = 0; i < max; i += 1) {
    if (await page.evaluate(() => document.activeElement?.id) === id) return;
    await page.keyboard.press('Tab');
  }
  fail(`#${id} was not reached with ${max} presses of Tab`);
}

async function focusVisible(page) {
  return page.evaluate(() => {
    const style = getComputedStyle(document.activeElement);
    return style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0;
  });
}

/** Runs `action`, then waits until the console finished opening a patient. */
async function patientOpened(page, action) {
  const before = await page.evaluate(() => window.clinflowTimings.patientOpens.length);
  await action();
  await page.waitForFunction((n) => window.clinflowTimings.patientOpens.length > n, before, { timeout: 30_000 });
  return page.evaluate(() => window.clinflowTimings.patientOpen);
}

async function openPatientByForm(page, ref) {
  return patientOpened(page, async () => {
    await page.fill('#patient-ref', ref);
    await page.press('#patient-ref', 'Enter');
  });
}

async function expectPatientShown(page, ref) {
  await page.locator('#patient').waitFor({ state: 'visible' });
  const name = (await page.textContent('#patient-name')).trim();
  check(name === ref, `the patient shown is "${name}", expected "${ref}"`);
  const notes = await page.locator('#notes-list article.note').count();
  check(notes > 0, `no notes are shown for ${ref}`);
  const problems = await page.locator('#problems-body tr[data-cui]').count();
  check(problems > 0, `the problem list of ${ref} is empty`);
}

/** No patient reference in the URL, the title or browser storage. */
async function expectNoPhiInBrowser(page, where) {
  const seen = await page.evaluate(() => ({
    url: location.href,
    title: document.title,
    local: JSON.stringify(Object.entries(localStorage)),
    localCount: localStorage.length,
    session: JSON.stringify(Object.entries(sessionStorage)),
    sessionCount: sessionStorage.length,
  }));
  for (const ref of refs) {
    for (const [what, value] of [['URL', seen.url], ['title', seen.title], ['localStorage', seen.local], ['sessionStorage', seen.session]]) {
      check(!value.includes(ref), `${where}: the ${what} holds the patient reference ${ref}: ${value}`);
    }
  }
  check(seen.localCount === 0 && seen.sessionCount === 0, `${where}: the console wrote to browser storage (${seen.local} ${seen.session})`);
  check(/\/ui(#[a-z]+)?$/.test(seen.url), `${where}: the URL is ${seen.url}, expected /ui or /ui#<view>`);
}

/** The console's rule for overlapping spans: by start, longest first, skip overlaps. */
function visibleSpans(spans) {
  const sorted = [...spans].sort((a, b) => a.start - b.start || (b.end - b.start) - (a.end - a.start));
  const kept = [];
  let reach = 0;
  for (const s of sorted) {
    if (s.start < reach) continue;
    kept.push(s);
    reach = s.end;
  }
  return kept;
}

/** A call from the page with the console's CSRF header (or without it). */
async function pageFetch(page, method, path, { body, csrf = true } = {}) {
  return page.evaluate(async ({ method, path, body, csrf }) => {
    const headers = { Accept: 'application/json' };
    const token = document.cookie.split(';').map((c) => c.trim()).find((c) => c.startsWith('__Host-clinflow-csrf='));
    if (csrf && token) headers['X-CSRF-Token'] = token.slice(token.indexOf('=') + 1);
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let json = null;
    try { json = await r.json(); } catch { /* no body */ }
    return { status: r.status, json };
  }, { method, path, body, csrf });
}

async function axe(page, name) {
  // The page's CSP forbids inline script, so addScriptTag cannot inject axe;
  // Runtime.evaluate (page.evaluate) is not subject to the page's CSP.
  await page.evaluate(AXE_SOURCE);
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
  for (const v of result.violations) {
    const targets = v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ');
    const line = `${name}: [${v.impact}] ${v.id}: ${v.help} (${v.nodes.length} nodes: ${targets})`;
    if (v.impact === 'serious' || v.impact === 'critical') failures.push(`axe ${line}`);
    axeFindings.push(line);
    console.log(`axe  ${line}`);
  }
  if (!result.violations.length) console.log(`axe  ${name}: no violations`);
}

async function retryUntil(what, timeoutMs, fn) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) fail(`${what} (after ${timeoutMs / 1000} s): ${last.message}`);
    await sleep(1000);
  }
}

// ------------------------------------------------------------------ steps

const alice = await newPage();
const timingsOut = {};

await step('keyboard: sign in and open a patient with Tab and Enter only', async () => {
  await gotoConsole(alice);
  await axe(alice, 'login');
  await alice.evaluate(() => document.activeElement?.blur());
  await tabTo(alice, 'login-username');
  check(await focusVisible(alice), 'the focused username field shows no focus outline');
  await alice.keyboard.type(users.clinician);
  await alice.keyboard.press('Tab');
  check(await alice.evaluate(() => document.activeElement.id) === 'login-password', 'Tab from the username does not reach the password');
  await alice.keyboard.type(password);
  await alice.keyboard.press('Tab');
  check(await alice.evaluate(() => document.activeElement.id) === 'login-submit', 'Tab from the password does not reach the sign-in button');
  check(await focusVisible(alice), 'the focused sign-in button shows no focus outline');
  await alice.keyboard.press('Enter');
  await signedIn(alice, users.clinician);
  await alice.evaluate(() => document.activeElement?.blur());
  await tabTo(alice, 'patient-ref');
  await alice.keyboard.type(fixture.patient);
  await patientOpened(alice, () => alice.keyboard.press('Enter'));
  await expectPatientShown(alice, fixture.patient);
  // A concept span is reachable by Tab too.
  for (let i = 0; i < 400; i += 1) {
    if (await alice.evaluate(() => document.activeElement?.matches('mark.span'))) break;
    await alice.keyboard.press('Tab');
  }
  check(await alice.evaluate(() => document.activeElement?.matches('mark.span')), 'no concept span is reachable with Tab');
  await alice.locator('#concept-popup').waitFor({ state: 'visible' });
  await alice.keyboard.press('Escape');
  await alice.locator('#concept-popup').waitFor({ state: 'hidden' });
});

await step('clinician: spans at the API offsets, popup, problem list, no PHI in URL/title/storage', async () => {
  const id = fixture.expected.document_id;
  if (!(await alice.locator('#patient-name').isVisible()) || (await alice.textContent('#patient-name')).trim() !== fixture.patient) {
    await openPatientByForm(alice, fixture.patient);
  }
  await expectPatientShown(alice, fixture.patient);
  const note = alice.locator(`article.note[data-document-id="${id}"]`);
  for (let i = 0; i < 30 && !(await note.count()); i += 1) {
    check(await alice.locator('#notes-more').isVisible(), `document ${id} is not among the patient's notes`);
    await alice.click('#notes-more');
    await alice.waitForFunction(() => !document.querySelector('#notes-list article[aria-busy]'));
  }
  await alice.waitForFunction((docId) => {
    const a = document.querySelector(`article.note[data-document-id="${docId}"]`);
    return a && !a.hasAttribute('aria-busy');
  }, id);

  // What the API says about the document (the same read the console made).
  const read = await pageFetch(alice, 'GET', `/v1/documents/${id}?include=text`);
  check(read.status === 200, `GET /v1/documents/${id} answered ${read.status}`);
  const doc = read.json;
  const points = Array.from(doc.text);
  for (const s of fixture.expected.spans) {
    check(doc.annotations.some((a) => a.cui === s.cui && a.start === s.start && a.end === s.end),
      `fixture span ${JSON.stringify(s)} is not among the API's annotations`);
  }
  const expected = visibleSpans(fixture.expected.spans);
  check(expected.length > 0, 'the fixture expects no spans');
  const shown = await note.locator('.note-text mark.span').evaluateAll((marks) => marks.map((m) => ({
    cui: m.dataset.cui, start: Number(m.dataset.start), end: Number(m.dataset.end),
    negated: m.classList.contains('negated'), text: m.textContent, tabIndex: m.tabIndex,
  })));
  const key = (s) => `${s.cui}@${s.start}-${s.end}`;
  check(shown.length === expected.length,
    `${shown.length} spans highlighted, expected ${expected.length}: shown ${shown.map(key).join(' ')}; expected ${expected.map(key).join(' ')}`);
  expected.forEach((e, i) => {
    const s = shown[i];
    check(key(s) === key(e), `span ${i} is ${key(s)}, expected ${key(e)}`);
    const slice = points.slice(e.start, e.end).join('');
    check(s.text === slice, `span ${key(e)} reads "${s.text}", the note's code points ${e.start}..${e.end} are "${slice}"`);
    check(s.negated === Boolean(e.negated), `span ${key(e)}: negated class ${s.negated}, expected ${Boolean(e.negated)}`);
    check(s.tabIndex === 0, `span ${key(e)} is not focusable`);
  });
  const wholeText = await note.locator('.note-text').textContent();
  check(wholeText === doc.text, 'the note text shown differs from the API\'s text');
  const negatedStyle = await alice.evaluate(() => {
    const probe = document.querySelector('.legend .span.negated');
    const plain = document.querySelector('.legend .span:not(.negated)');
    const n = getComputedStyle(probe);
    const p = getComputedStyle(plain);
    return { differ: n.textDecorationLine !== p.textDecorationLine || n.borderTopStyle !== p.borderTopStyle, n: n.textDecorationLine, p: p.textDecorationLine };
  });
  check(negatedStyle.differ, `negated spans differ from affirmed ones by colour alone (${JSON.stringify(negatedStyle)})`);

  // The popup: on hover, then on focus.
  const target = expected.find((s) => s.cui === fixture.cui) || expected[0];
  const annotation = doc.annotations.find((a) => a.cui === target.cui && a.start === target.start);
  const mark = note.locator(`mark.span[data-start="${target.start}"][data-end="${target.end}"]`);
  const expectPopup = async (how) => {
    await alice.locator('#concept-popup').waitFor({ state: 'visible' });
    const [name, cui, model] = await Promise.all(['#popup-name', '#popup-cui', '#popup-model'].map((s) => alice.textContent(s)));
    check(name === annotation.pretty_name, `${how}: the popup names "${name}", expected "${annotation.pretty_name}"`);
    if (target.cui === fixture.cui) check(name === fixture.cui_name, `${how}: the popup names "${name}", expected "${fixture.cui_name}"`);
    check(cui === target.cui, `${how}: the popup's CUI is "${cui}", expected ${target.cui}`);
    check(model === doc.model_version, `${how}: the popup's model is "${model}", expected "${doc.model_version}"`);
  };
  await alice.mouse.move(5, 795);
  await mark.hover();
  await expectPopup('hover');
  await shot(alice, 'clinician-patient.png');
  await alice.mouse.move(5, 795);
  await alice.locator('#concept-popup').waitFor({ state: 'hidden' });
  await mark.focus();
  await expectPopup('focus');
  check(await mark.getAttribute('aria-describedby') === 'concept-popup', 'the focused span is not described by the popup');
  await alice.keyboard.press('Escape');

  // The problem list, beside the notes.
  await alice.evaluate(() => { window.scrollTo(0, 0); document.querySelector('#problem-list').scrollTop = 0; });
  const problem = alice.locator(`#problems-body tr[data-cui="${fixture.cui}"]`);
  check(await problem.count() === 1, `the problem list has no row for ${fixture.cui}`);
  const [listBox, notesBox] = [await alice.locator('#problem-list').boundingBox(), await alice.locator('#notes').boundingBox()];
  check(listBox && notesBox && listBox.x + listBox.width <= notesBox.x + 1, 'the problem list is not beside the notes');
  await shot(alice, 'clinician-problem-list.png');
  await axe(alice, 'patient');
  await expectNoPhiInBrowser(alice, 'patient page');
});

await step('clinician: my patients with a concept, and open one', async () => {
  await alice.click('#nav-concepts');
  await alice.locator('#concept-cui').waitFor({ state: 'visible' });
  await alice.fill('#concept-cui', fixture.cui);
  await alice.press('#concept-cui', 'Enter');
  await alice.locator('#concept-results').waitFor({ state: 'visible' });
  const row = alice.locator('tr.concept-row', { has: alice.locator('.patient-ref', { hasText: fixture.patient }) });
  await row.first().waitFor();
  check(await row.count() === 1, `${fixture.patient} is listed ${await row.count()} times for ${fixture.cui}`);
  await shot(alice, 'clinician-concept.png');
  await axe(alice, 'concept');
  await expectNoPhiInBrowser(alice, 'concept page');
  await patientOpened(alice, () => row.locator('button').click());
  await expectPatientShown(alice, fixture.patient);
  check(new URL(alice.url()).hash === '#patients', `opening from the concept list went to ${alice.url()}`);
});

await step('timings: a 200-note patient and a 100-concept note', async () => {
  const bigOpen = await openPatientByForm(alice, fixture.big_patient);
  await expectPatientShown(alice, fixture.big_patient);
  await alice.waitForFunction(() => window.clinflowTimings.patientOpenPainted !== null);
  const bigPainted = await alice.evaluate(() => window.clinflowTimings.patientOpenPainted);
  const notes = await alice.locator('#notes-list article.note').count();
  check(notes === 10, `${notes} notes rendered at first for ${fixture.big_patient}, expected the newest 10`);
  const countText = await alice.textContent('#notes-count');
  const denseOpen = await openPatientByForm(alice, fixture.dense.patient_ref);
  const denseId = fixture.dense.document_id;
  const note = alice.locator(`article.note[data-document-id="${denseId}"]`);
  await note.waitFor();
  const spans = await note.locator('mark.span').count();
  const expectedSpans = visibleSpans(fixture.dense.spans).length;
  check(spans === expectedSpans, `the dense note shows ${spans} spans, expected ${expectedSpans} (of ${fixture.dense.spans.length}, overlaps dropped)`);
  const t = await alice.evaluate(() => ({
    timings: window.clinflowTimings,
    measures: performance.getEntriesByType('measure').map((m) => ({ name: m.name, ms: m.duration, doc: m.detail?.docId })),
  }));
  const render = t.timings.noteRender[denseId];
  await alice.waitForFunction((id) => window.clinflowTimings.notePainted[id] !== undefined, denseId);
  const renderPainted = await alice.evaluate((id) => window.clinflowTimings.notePainted[id], denseId);
  check(typeof render === 'number', `no note-render timing for ${denseId}`);
  check(t.measures.some((m) => m.name === 'patient-open') && t.measures.some((m) => m.name === 'note-render' && m.doc === denseId),
    'performance.measure entries patient-open / note-render are missing');
  const renders = Object.values(t.timings.noteRender);
  Object.assign(timingsOut, {
    big_patient_notes_listed: countText.trim(),
    big_patient_open_ms: bigOpen,
    big_patient_open_painted_ms: bigPainted,
    dense_patient_open_ms: denseOpen,
    dense_note_spans: spans,
    dense_note_render_ms: render,
    dense_note_painted_ms: renderPainted,
    max_note_render_ms: Math.max(...renders),
    notes_rendered: renders.length,
    limits: { patient_open_ms: OPEN_LIMIT_MS, note_render_ms: RENDER_LIMIT_MS },
  });
  writeFileSync(fixture.timings_out, JSON.stringify(timingsOut, null, 2));
  console.log(`     patient with 200 notes opened in ${bigOpen} ms (painted ${bigPainted} ms); `
    + `note with ${spans} concepts built in ${render} ms (painted ${renderPainted} ms)`);
  // Measured and reported (docs/console.md), not a pass mark: a timed
  // assertion on a shared machine fails on its noise, not on the console.
  for (const [ms, limit, what] of [[bigOpen, OPEN_LIMIT_MS, 'the 200-note patient opened'], [render, RENDER_LIMIT_MS, 'the 100-concept note rendered']]) {
    if (ms > limit) console.log(`     NOTE: ${what} in ${ms} ms, over its ${limit} ms target`);
  }
});

await step('clinician: a negated mention is styled apart (one answer rewritten in the browser)', async () => {
  // The MedCAT of the tests has no MetaCAT add-on, so no real answer
  // carries a negation. This step alone rewrites one annotation of one
  // answer, in the browser (page.route), to say what a MetaCAT model says
  // of a negated mention, and checks that the page shows it apart from the
  // affirmed ones, in its class and its popup. It is named as a stand-in:
  // nothing else in this test is.
  const id = fixture.expected.document_id;
  const first = visibleSpans(fixture.expected.spans)[0];
  await alice.route(`**/v1/documents/${id}?include=text`, async (route) => {
    const response = await route.fetch();
    const doc = await response.json();
    const a = doc.annotations.find((x) => x.start === first.start && x.end === first.end);
    a.meta_anns = { Presence: { value: 'False', confidence: 0.97, name: 'Presence' } };
    await route.fulfill({ response, json: doc });
  });
  await openPatientByForm(alice, fixture.patient);
  await expectPatientShown(alice, fixture.patient);
  const note = alice.locator(`article.note[data-document-id="${id}"]`);
  await note.waitFor();
  const negated = note.locator(`mark.span[data-start="${first.start}"][data-end="${first.end}"]`);
  check(await negated.evaluate((el) => el.classList.contains('negated')), 'the rewritten mention is not styled as negated');
  const affirmed = await note.locator('mark.span:not(.negated)').count();
  check(affirmed === visibleSpans(fixture.expected.spans).length - 1, `${affirmed} affirmed spans beside the negated one`);
  const [a, b] = await Promise.all([
    negated.evaluate((el) => getComputedStyle(el).textDecorationLine),
    note.locator('mark.span:not(.negated)').first().evaluate((el) => getComputedStyle(el).textDecorationLine),
  ]);
  check(a !== b, `negated and affirmed spans look alike (text-decoration ${a} / ${b})`);
  await negated.focus();
  await alice.locator('#concept-popup').waitFor({ state: 'visible' });
  const popup = await alice.textContent('#concept-popup');
  check(/negated/i.test(popup), `the popup of a negated mention does not say so: ${popup}`);
  await shot(alice, 'clinician-negated.png');
  await alice.unroute(`**/v1/documents/${id}?include=text`);
});

await step('outsider: refused, then break-glass with banner', async () => {
  const bob = await newPage();
  await loginByForm(bob, users.outsider);
  await bob.fill('#patient-ref', fixture.patient);
  await bob.press('#patient-ref', 'Enter');
  await bob.locator('#break-glass').waitFor({ state: 'visible' });
  const message = await bob.textContent('#patient-error');
  check(/not in your care teams/i.test(message), `the refusal says "${message}"`);
  check(await bob.locator('#notes-list article').count() === 0, 'notes are shown to an outsider');
  check(!(await bob.locator('#patient').isVisible()), 'the patient view is shown to an outsider');
  check(!(await bob.locator('#banner-break-glass').isVisible()), 'a break-glass banner shows before any grant');
  await bob.fill('#bg-reason', 'Covering the on-call cardiology registrar: patient arrived in ED with fast AF');
  await bob.fill('#bg-password', password);
  await patientOpened(bob, () => bob.click('#bg-submit'));
  await expectPatientShown(bob, fixture.patient);
  const banner = bob.locator('#banner-break-glass');
  await banner.waitFor({ state: 'visible' });
  const text = await banner.textContent();
  check(/Break-glass access active until \d\d:\d\d/.test(text), `the banner says "${text}"`);
  check(await banner.getAttribute('role') === 'status' && await banner.evaluate((b) => b.classList.contains('banner-break-glass')),
    'the banner is not a role=status .banner-break-glass');
  await bob.evaluate(() => window.scrollTo(0, 0));
  await shot(bob, 'break-glass.png');
  await expectNoPhiInBrowser(bob, 'break-glass');
  await bob.context().close();
});

await step('csrf: requests without the token, and a forged cross-site post, are refused', async () => {
  await alice.evaluate(() => window.scrollTo(0, 0));
  const before = await pageFetch(alice, 'GET', '/v1/auth/session');
  check(before.status === 200, `GET /v1/auth/session with the token answered ${before.status}`);
  const bare = await pageFetch(alice, 'GET', '/v1/auth/session', { csrf: false });
  check(bare.status === 403 && bare.json?.error?.code === 'csrf_token', `GET without X-CSRF-Token answered ${bare.status} ${JSON.stringify(bare.json)}`);
  const body = { patient_ref: 'PAT-FORGED-1', reason: 'forged by another page', password };
  const post = await pageFetch(alice, 'POST', '/v1/break-glass', { body, csrf: false });
  check(post.status === 403 && post.json?.error?.code === 'csrf_token', `POST /v1/break-glass without X-CSRF-Token answered ${post.status} ${JSON.stringify(post.json)}`);

  // Another site's page posts a form to the api while alice's cookies exist.
  const attacker = await alice.context().newPage();
  const fieldName = JSON.stringify(body).slice(0, -2) + '"';
  await attacker.route('https://attacker.example/**', (route) => route.fulfill({
    contentType: 'text/html',
    body: `<!doctype html><title>win a prize</title><form method="post" enctype="text/plain" action="${base}/v1/break-glass">`
      + `<input type="hidden" name='${fieldName.replace(/'/g, '&#39;')}' value='x"}'><button id="go">go</button></form>`,
  }));
  await attacker.goto('https://attacker.example/');
  const [response] = await Promise.all([
    attacker.waitForResponse((r) => r.url() === `${base}/v1/break-glass`),
    attacker.click('#go'),
  ]);
  check(response.status() < 200 || response.status() >= 300, `the forged cross-site post answered ${response.status()}`);
  await attacker.close();
  const after = await pageFetch(alice, 'GET', '/v1/auth/session');
  check(after.status === 200, `alice's session is gone after the forgery (${after.status})`);
  check(after.json.break_glass.length === before.json.break_glass.length, 'a forged request opened a break-glass grant');
});

await step('ops: overview, dead letter replayed', async () => {
  const olga = await newPage();
  await loginByForm(olga, users.ops);
  await olga.locator('#view-ops').waitFor({ state: 'visible' });
  await olga.locator('#ops-queues tr[data-queue="documents.live"]').waitFor();
  for (const q of ['documents.live', 'documents.backfill', 'documents.live.dead', 'audit']) {
    check(await olga.locator(`#ops-queues tr[data-queue="${q}"]`).count() === 1, `queue ${q} is not shown`);
  }
  for (const s of ['queued', 'processing', 'done', 'failed']) {
    check(await olga.locator(`#ops-documents .tile[data-status="${s}"]`).count() === 1, `documents ${s} are not counted`);
  }
  check(await olga.locator('#ops-models tr[data-model]').count() > 0, 'no model version is shown');
  const row = olga.locator(`tr.dead-row[data-document-id="${fixture.dead_letter_document}"]`);
  await retryUntil(`dead letter ${fixture.dead_letter_document} is listed`, 30_000, async () => {
    if (await row.count() === 1) return;
    await olga.click('#ops-refresh');
    await olga.waitForFunction(() => !document.querySelector('#ops-refresh[aria-busy]'));
    check(await row.count() === 1, 'not listed yet');
  });
  await shot(olga, 'ops.png');
  await axe(olga, 'ops');
  await row.locator('button').click();
  await olga.locator('#confirm-dialog').waitFor({ state: 'visible' });
  await axe(olga, 'ops confirm dialog');
  await olga.click('#confirm-ok');
  await olga.waitForFunction(() => document.querySelector('#dead-result').textContent.startsWith('Replayed'));
  const result = await olga.textContent('#dead-result');
  check(/Replayed 1|already done 1/.test(result), `the replay says "${result}"`);
  await olga.waitForFunction(() => !document.querySelector('#ops-refresh[aria-busy]'));
  check(await row.count() === 0, 'the replayed dead letter is still listed');
  await shot(olga, 'ops-replayed.png');
  await olga.context().close();
});

await step('auditor: events by actor and action, chain verified, disclosures', async () => {
  const audrey = await newPage();
  await loginByForm(audrey, users.auditor);
  await audrey.locator('#view-audit').waitFor({ state: 'visible' });
  await audrey.fill('#audit-actor', users.clinician);
  await audrey.fill('#audit-action', 'document.read');
  const rows = audrey.locator('tr.event-row');
  await retryUntil(`alice's read of ${fixture.expected.document_id} on the trail`, AUDIT_WAIT_MS, async () => {
    await audrey.click('#audit-search');
    await audrey.waitForFunction(() => !document.querySelector('#audit-search[aria-busy]'));
    const seen = await rows.evaluateAll((rs) => rs.map((r) => ({ ...r.dataset })));
    check(seen.length > 0, 'no events');
    for (const e of seen) check(e.actor === users.clinician && e.action === 'document.read', `an event of ${e.actor} ${e.action} passed the filter`);
    check(seen.some((e) => e.resourceId === fixture.expected.document_id && e.outcome === 'success'), 'the read is not there yet');
  });
  await audrey.click('#verify-run');
  await audrey.waitForFunction(() => document.querySelector('#verify-result').dataset.intact !== undefined
    || document.querySelector('#verify-error').textContent !== '');
  const verifyError = await audrey.textContent('#verify-error');
  check(verifyError === '', `verification failed: ${verifyError}`);
  check(await audrey.getAttribute('#verify-result', 'data-intact') === 'true', `the chain is not intact: ${await audrey.textContent('#verify-result')}`);
  await shot(audrey, 'audit.png');
  await axe(audrey, 'audit');

  await audrey.click('#nav-disclosures');
  await audrey.locator('#disclosure-ref').waitFor({ state: 'visible' });
  await audrey.fill('#disclosure-ref', fixture.patient);
  const drows = audrey.locator('tr.disclosure-row');
  await retryUntil(`alice's and bob's reads of ${fixture.patient} among the disclosures`, AUDIT_WAIT_MS, async () => {
    await audrey.press('#disclosure-ref', 'Enter');
    await audrey.locator('#disclosure-results').waitFor({ state: 'visible' });
    await audrey.waitForFunction(() => document.querySelector('#disclosure-count').textContent !== '');
    const seen = await drows.evaluateAll((rs) => rs.map((r) => ({ ...r.dataset })));
    const reads = (who) => seen.filter((d) => d.actor === who && d.outcome === 'success' && /^(document|patient)\.read$/.test(d.action));
    check(reads(users.clinician).length > 0, `no read by ${users.clinician}`);
    check(reads(users.outsider).some((d) => d.breakGlass === 'true'), `no read by ${users.outsider} under break-glass`);
    check(!reads(users.outsider).some((d) => d.breakGlass !== 'true'), `a read by ${users.outsider} without break-glass`);
    check(seen.some((d) => d.actor === users.outsider && d.outcome === 'denied'), `${users.outsider}'s refusal is not listed`);
  });
  await shot(audrey, 'audit-disclosures.png');
  await axe(audrey, 'disclosures');
  await expectNoPhiInBrowser(audrey, 'disclosures');
  await audrey.context().close();
});

await step('session: sign out drops the patient from the page', async () => {
  lastPage = alice;
  await alice.bringToFront();
  await alice.click('#logout');
  await alice.locator('#login-username').waitFor({ state: 'visible' });
  const leftover = await alice.evaluate((rs) => rs.filter((r) => document.body.textContent.includes(r)), refs);
  check(leftover.length === 0, `the signed-out page still shows ${leftover.join(', ')}`);
  const after = await pageFetch(alice, 'GET', '/v1/auth/session');
  check(after.status === 401, `after sign-out GET /v1/auth/session answered ${after.status}`);
});

await step('idle: a warning before the idle timeout, then the sign-out', async () => {
  // An api of the same stack whose sessions end after `idle.timeout_seconds`.
  const { base: idleBase, timeout_seconds: timeout } = fixture.idle;
  const page = await newPage();
  await page.goto(`${idleBase}/ui`);
  await page.fill('#login-username', users.clinician);
  await page.fill('#login-password', password);
  await page.click('#login-submit');
  await signedIn(page, users.clinician);
  const dialog = page.locator('#idle-dialog');
  await dialog.waitFor({ state: 'visible', timeout: timeout * 1000 });
  check(await page.evaluate(() => document.activeElement?.id) === 'idle-stay', 'the warning does not take the focus');
  await shot(page, 'idle-warning.png');
  await page.keyboard.press('Enter');
  await dialog.waitFor({ state: 'hidden' });
  const still = await pageFetch(page, 'GET', '/v1/auth/session');
  check(still.status === 200, `"Stay signed in" kept no session: ${still.status}`);
  // Left alone this time: the console signs out before the server would.
  await dialog.waitFor({ state: 'visible', timeout: timeout * 1000 });
  await page.locator('#login-username').waitFor({ state: 'visible', timeout: timeout * 1000 });
  const notice = await page.textContent('#login-notice');
  check(/idle/i.test(notice), `no idle notice after the sign-out: "${notice}"`);
  const after = await pageFetch(page, 'GET', '/v1/auth/session');
  check(after.status === 401, `after the idle sign-out GET /v1/auth/session answered ${after.status}`);
  await page.context().close();
});

await browser.close();
writeFileSync(fixture.timings_out, JSON.stringify({ ...timingsOut, axe_other_findings: axeFindings }, null, 2));
if (failures.length) {
  console.log(`\n${failures.length} failure(s):`);
  for (const f of failures) console.log(`  - ${f}`);
  process.exit(1);
}
console.log('console test: all steps passed');
