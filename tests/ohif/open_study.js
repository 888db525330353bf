// Open one study in OHIF v3 in headless Chromium, optionally open its SR, and report what is drawn.
//
// Run by tests/viewer.py:open_study with NODE_PATH=<cache>/node_modules and the arguments as JSON in
// $OPEN_STUDY_ARGS: {url, screenshot, openSr, srSeriesUid, chromium, timeoutMs, settleMs, width, height}.
// Prints progress on stderr and one JSON object as the last line of stdout:
//   ok                  true when every step finished (false: see error)
//   error               the first step that failed, or null
//   ct_rendered         a CT image was rendered in a viewport
//   sr_opened           the SR display set is in a viewport (method: "double-click" or "viewportGridService")
//   sr_unplaced         OHIF loaded the SR but put none of its measurements on an image (nothing to draw)
//   annotations         element children of svg.svg-layer (minus <defs>/<style>) over the viewport showing the SR
//                       (over all viewports when no SR was opened)
//   shapes              their tag names; annotation_texts: the text drawn in the SVG layer
//   geometry            where the shapes are, in pixels (column, row) of the shown image: ellipse centre and
//                       radius, line ends (a POINT is drawn as an arrow: 3 lines, one end on the point)
//   sop_instance_uid    the SOP Instance UID of the image shown in that viewport
//   instance_number     InstanceNumber read from the viewport overlay ("I: n (k/N)"); slice: k; slices: N
//   viewports           per cornerstone viewport: id, imageIndex, sopInstanceUID, svg children, overlay text
//   sr                  OHIF's SR display sets: SOPClassUID, isImagingMeasurementReport, measurements (labels...)
//   viewport_text       the text shown in the viewport grid (messages such as "No image")
//   dialogs             text of dialogs/notifications that were visible; tour_seen: a tour overlay appeared
//   console_errors      console.error messages and page errors; http_errors: responses >= 400
//   blocked_requests    requests to anything but the Orthanc origin (aborted)
//   timings             ms since start: browser, page, ct, sr, done
// Every wait is bounded; a watchdog prints what it has and exits 3 at timeoutMs.
'use strict';

const fs = require('fs');
const puppeteer = require('puppeteer-core');

const args = JSON.parse(process.env.OPEN_STUDY_ARGS || '{}');
const t0 = Date.now();
const deadline = t0 + (args.timeoutMs || 57000);
const origin = new URL(args.url).origin;
const log = (...a) => process.stderr.write(`[open_study +${Date.now() - t0}ms] ${a.join(' ')}\n`);
const sleep = ms => new Promise(r => setTimeout(r, ms));
const left = () => deadline - Date.now();

const result = {
  ok: false, error: null, url: args.url, ct_rendered: false, sr_opened: false, method: null,
  annotations: 0, shapes: [], annotation_texts: [], geometry: [], sop_instance_uid: null, instance_number: null, slice: null, slices: null,
  viewports: [], sr: [], viewport_text: '', dialogs: [], tour_seen: false,
  console_errors: [], console_warnings: [], http_errors: [], blocked_requests: [], timings: {},
  screenshot: args.screenshot || null,
};
let browser = null;
let page = null;
let emitted = false;

function emit(code) {
  if (emitted) return;
  emitted = true;
  result.timings.done = Date.now() - t0;
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exitCode = code;
}

const watchdog = setTimeout(async () => {
  result.error = result.error || `timeout after ${args.timeoutMs} ms`;
  log('watchdog:', result.error);
  try { if (page && args.screenshot) await Promise.race([page.screenshot({ path: args.screenshot }), sleep(2000)]); } catch (e) { /* best effort */ }
  emit(3);
  try { if (browser) browser.process()?.kill('SIGKILL'); } catch (e) { /* gone */ }
  process.exit(3);
}, Math.max(5000, args.timeoutMs || 57000));

async function poll(what, fn, ms, interval = 250) {
  const until = Math.min(deadline - 1500, Date.now() + ms);
  let last;
  while (Date.now() < until) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = null;
    }
    await sleep(interval);
  }
  log(`gave up waiting for ${what}`);
  return null;
}

// ---------------------------------------------------------------- in-page probes (run in the browser)

function probeViewports() {
  const out = [];
  const cs = window.cornerstone;
  const enabled = cs && cs.getEnabledElements ? cs.getEnabledElements() : [];
  for (const ee of enabled) {
    const vp = ee.viewport;
    if (!vp) continue;
    const el = vp.element;
    const svg = el ? el.querySelector('svg.svg-layer') : null;
    const children = svg ? Array.from(svg.children).filter(c => !['defs', 'style'].includes(c.tagName.toLowerCase())) : [];
    let imageId = null;
    let imageIndex = null;
    let hasImage = false;
    try { imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null; } catch (e) { /* volume */ }
    try { imageIndex = vp.getCurrentImageIdIndex ? vp.getCurrentImageIdIndex() : null; } catch (e) { /* none */ }
    try { hasImage = Boolean(vp.getImageData && vp.getImageData()); } catch (e) { hasImage = false; }
    let sop = null;
    if (imageId) {
      const m = /instances\/([0-9.]+)/.exec(imageId);
      sop = m ? m[1] : null;
    }
    // the overlay sits in the viewport pane around the cornerstone element
    let inst = null;
    for (let a = el, up = 0; a && up < 8 && !inst; a = a.parentElement, up++) {
      inst = a.querySelector('.overlay-item[title="Instance Number"]');
    }
    // where the shapes are, in image pixels (column, row) of the shown image: ellipse centres, line ends
    const toImage = (x, y) => {
      try {
        const w = vp.canvasToWorld([x, y]);
        const p = cs.utilities.worldToImageCoords(imageId, w);
        return [Math.round(p[0] * 10) / 10, Math.round(p[1] * 10) / 10];
      } catch (e) { return null; }
    };
    const geometry = [];
    for (const c of children) {
      for (const e of [c, ...c.querySelectorAll('ellipse, circle, line')]) {
        const tag = e.tagName.toLowerCase();
        const n = k => parseFloat(e.getAttribute(k));
        if (tag === 'ellipse' || tag === 'circle') {
          const rx = tag === 'circle' ? n('r') : n('rx');
          const c0 = toImage(n('cx'), n('cy'));
          const c1 = toImage(n('cx') + rx, n('cy'));
          geometry.push({ tag, center: c0, radius: c0 && c1 ? Math.round(Math.hypot(c1[0] - c0[0], c1[1] - c0[1]) * 10) / 10 : null });
        } else if (tag === 'line') {
          geometry.push({ tag, from: toImage(n('x1'), n('y1')), to: toImage(n('x2'), n('y2')) });
        }
      }
    }
    out.push({
      id: vp.id, type: vp.type, imageIndex, imageId, sopInstanceUID: sop, hasImage, geometry,
      svgChildren: children.length,
      shapes: children.map(c => c.tagName.toLowerCase() + (c.getAttribute('data-id') ? `#${c.getAttribute('data-id')}` : '')),
      texts: svg ? Array.from(svg.querySelectorAll('text')).map(t => t.textContent).filter(Boolean) : [],
      instanceText: inst ? inst.textContent.trim() : null,
      displaySetUIDs: (() => {
        try {
          const st = window.services.viewportGridService.getState();
          const v = st.viewports.get(vp.id);
          return v ? v.displaySetInstanceUIDs : [];
        } catch (e) { return []; }
      })(),
    });
  }
  return out;
}

function probeSR() {
  const ds = window.services ? window.services.displaySetService.getActiveDisplaySets() : [];
  return ds.filter(d => d.Modality === 'SR').map(d => ({
    displaySetInstanceUID: d.displaySetInstanceUID,
    SeriesInstanceUID: d.SeriesInstanceUID,
    SOPInstanceUID: d.SOPInstanceUID,
    SOPClassUID: d.SOPClassUID,
    SOPClassHandlerId: d.SOPClassHandlerId,
    isImagingMeasurementReport: d.isImagingMeasurementReport,
    isLoaded: d.isLoaded, isRehydratable: d.isRehydratable, isHydrated: d.isHydrated,
    measurements: (d.measurements || []).map(m => ({
      loaded: m.loaded, TrackingIdentifier: m.TrackingIdentifier, graphicType: m.graphicType,
      graphicCode: m.graphicCode, labels: m.labels, coords: (m.coords || []).length,
      ReferencedSOPInstanceUID: m.ReferencedSOPInstanceUID || null,
    })),
  }));
}

function probePage() {
  const texts = [];
  for (const sel of ['[role="dialog"]', '[role="alertdialog"]', '[data-cy="viewport-notification"]', '.shepherd-element', '[data-sonner-toast]', '[role="status"]']) {
    for (const el of document.querySelectorAll(sel)) {
      const t = (el.innerText || '').trim();
      if (t) texts.push(`${sel}: ${t.slice(0, 300)}`);
    }
  }
  const grid = document.querySelector('[data-cy="viewport-grid"]') || document.querySelector('#root');
  return {
    dialogs: texts,
    tour: Boolean(document.querySelector('.shepherd-element, .shepherd-modal-overlay-container.shepherd-modal-is-visible')),
    viewportText: grid ? (grid.innerText || '').trim().slice(0, 1000) : '',
  };
}

// ---------------------------------------------------------------- main

async function main() {
  const argv = [
    '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check', '--mute-audio',
    '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-default-apps',
    '--disable-domain-reliability', '--no-pings', '--disable-features=Translate,OptimizationHints,MediaRouter,InterestFeedContentSuggestions',
    // nothing but 127.0.0.1 resolves: the browser cannot reach any other host
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    `--window-size=${args.width || 1280},${args.height || 800}`,
  ];
  if (process.getuid && process.getuid() === 0) argv.push('--no-sandbox');
  browser = await puppeteer.launch({
    executablePath: args.chromium, headless: true, args: argv, protocolTimeout: 30000,
    defaultViewport: { width: args.width || 1280, height: args.height || 800 },
    timeout: 20000, handleSIGINT: false, handleSIGTERM: false, handleSIGHUP: false,
  });
  result.timings.browser = Date.now() - t0;
  page = await browser.newPage();
  page.setDefaultTimeout(15000);
  await page.setRequestInterception(true);
  page.on('request', req => {
    const u = req.url();
    if (u.startsWith(origin + '/') || u.startsWith('data:') || u.startsWith('blob:')) {
      req.continue().catch(() => {});
    } else {
      result.blocked_requests.push(u.slice(0, 200));
      req.abort('blockedbyclient').catch(() => {});
    }
  });
  page.on('console', msg => {
    const type = msg.type();
    const text = msg.text().slice(0, 500);
    if (type === 'error') result.console_errors.push(text);
    else if (type === 'warn' || type === 'warning') result.console_warnings.push(text);
  });
  page.on('pageerror', err => result.console_errors.push(`pageerror: ${String(err && err.message || err).slice(0, 500)}`));
  page.on('response', rsp => {
    if (rsp.status() >= 400) result.http_errors.push(`${rsp.status()} ${rsp.url().slice(0, 200)}`);
  });
  // OHIF's first-visit tour (shepherd.js) swallows clicks: mark it seen before the app starts.
  await page.evaluateOnNewDocument(() => {
    try {
      localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
      sessionStorage.setItem('investigationalUseDialog', 'hidden');
    } catch (e) { /* storage off */ }
    // errors in promises (e.g. in OHIF's SR load) are otherwise silent
    window.addEventListener('unhandledrejection', ev => {
      const r = ev.reason;
      console.error('unhandledrejection: ' + (r && (r.stack || r.message) || String(r)));
    });
  });
  await page.goto(args.url, { waitUntil: 'domcontentloaded', timeout: Math.min(20000, left() - 2000) });
  result.timings.page = Date.now() - t0;
  log('page loaded');

  // 1. the CT is rendered: a stack viewport with image data and an instance number overlay
  const ct = await poll('the CT image', async () => {
    const vps = await page.evaluate(probeViewports);
    return vps.find(v => v.hasImage && v.imageId && v.instanceText) ? vps : null;
  }, 30000);
  if (!ct) {
    result.error = 'CT was not rendered: ' + JSON.stringify(await page.evaluate(probeViewports).catch(e => String(e))).slice(0, 1500);
    return;
  }
  result.ct_rendered = true;
  result.timings.ct = Date.now() - t0;
  log('CT rendered');
  await removeTour();

  let srViewportId = null;
  if (args.openSr) {
    // 2. the SR display set and its thumbnail
    const srs = await poll('the SR display set', async () => {
      const s = await page.evaluate(probeSR);
      return s.length ? s : null;
    }, 10000);
    if (!srs) {
      result.error = 'no SR display set in the study';
      return;
    }
    let sr = srs[srs.length - 1];
    if (args.srSeriesUid) sr = srs.find(s => s.SeriesInstanceUID === args.srSeriesUid) || sr;
    const thumb = `[id="thumbnail-${sr.displaySetInstanceUID}"]`;
    const inViewport = async () => {
      const vps = await page.evaluate(probeViewports);
      const v = vps.find(x => (x.displaySetUIDs || []).includes(sr.displaySetInstanceUID));
      if (v) return v;
      // the SR viewport renders no cornerstone element until its referenced image is found
      return page.evaluate(uid => {
        const st = window.services.viewportGridService.getState();
        for (const [id, v] of st.viewports) if ((v.displaySetInstanceUIDs || []).includes(uid)) return { id, empty: true };
        return null;
      }, sr.displaySetInstanceUID);
    };
    const el = await poll('the SR thumbnail', () => page.$(thumb), 8000);
    if (el) {
      await el.evaluate(e => e.scrollIntoView({ block: 'center' }));
      await el.click({ count: 2, delay: 30 });
      result.method = 'double-click';
      if (!(await poll('the SR in a viewport', inViewport, 6000))) {
        await removeTour();
        await el.click({ count: 2, delay: 30 }).catch(() => {});
      }
    }
    let shown = await poll('the SR in a viewport', inViewport, el ? 6000 : 100);
    if (!shown) {
      // fall back on OHIF's own service (what the double-click does)
      result.method = 'viewportGridService';
      await page.evaluate(uid => {
        const g = window.services.viewportGridService;
        g.setDisplaySetsForViewport({ viewportId: g.getActiveViewportId(), displaySetInstanceUIDs: [uid] });
      }, sr.displaySetInstanceUID);
      shown = await poll('the SR in a viewport', inViewport, 8000);
    }
    if (!shown) {
      result.error = 'SR display set was not shown in a viewport';
      return;
    }
    result.sr_opened = true;
    srViewportId = shown.id;
    result.timings.sr = Date.now() - t0;
    log('SR in viewport', srViewportId, shown.empty ? '(no image)' : '');
    // 3. bounded wait for shapes in the SVG layer of that viewport, then let it settle; stop early
    //    when OHIF has loaded the SR and placed none of its measurements on an image for 4 s
    let unplacedSince = null;
    await poll('SR annotations', async () => {
      const vps = await page.evaluate(probeViewports);
      const v = vps.find(x => x.id === srViewportId);
      if (v && v.svgChildren > 0 && v.hasImage) return true;
      const s = (await page.evaluate(probeSR)).find(x => x.displaySetInstanceUID === sr.displaySetInstanceUID);
      if (s && s.isLoaded && !s.measurements.some(m => m.loaded)) {
        unplacedSince = unplacedSince || Date.now();
        if (Date.now() - unplacedSince > 4000) {
          result.sr_unplaced = true;
          return true;
        }
      } else {
        unplacedSince = null;
      }
      return false;
    }, Math.min(10000, left() - (args.settleMs || 0) - 4000));
  }
  await sleep(Math.max(0, Math.min(args.settleMs || 0, left() - 4000)));
  await removeTour();
  await collect(srViewportId);
  if (args.screenshot) await page.screenshot({ path: args.screenshot });
  result.ok = result.error === null;
}

async function removeTour() {
  const p = await page.evaluate(probePage).catch(() => null);
  if (p && p.tour) {
    result.tour_seen = true;
    await page.evaluate(() => {
      try { window.Shepherd && window.Shepherd.activeTour && window.Shepherd.activeTour.cancel(); } catch (e) { /* none */ }
      document.querySelectorAll('.shepherd-element, .shepherd-modal-overlay-container').forEach(e => e.remove());
    }).catch(() => {});
  }
}

async function collect(srViewportId) {
  const vps = await page.evaluate(probeViewports);
  result.viewports = vps;
  result.sr = await page.evaluate(probeSR);
  const p = await page.evaluate(probePage);
  result.dialogs = p.dialogs;
  result.viewport_text = p.viewportText;
  result.tour_seen = result.tour_seen || p.tour;
  const chosen = srViewportId ? vps.filter(v => v.id === srViewportId) : vps;
  result.annotations = chosen.reduce((n, v) => n + v.svgChildren, 0);
  result.shapes = chosen.flatMap(v => v.shapes);
  result.annotation_texts = chosen.flatMap(v => v.texts);
  result.geometry = chosen.flatMap(v => v.geometry);
  const main = chosen.find(v => v.instanceText) || vps.find(v => v.instanceText);
  if (main) {
    const m = /(\d+)\s*\((\d+)\/(\d+)\)/.exec(main.instanceText);
    if (m) {
      result.instance_number = Number(m[1]);
      result.slice = Number(m[2]);
      result.slices = Number(m[3]);
    } else {
      const k = /(\d+)\/(\d+)/.exec(main.instanceText);
      if (k) { result.slice = Number(k[1]); result.slices = Number(k[2]); }
    }
    result.sop_instance_uid = main.sopInstanceUID;
  }
}

main()
  .catch(err => {
    result.error = result.error || `driver error: ${String(err && err.stack || err).slice(0, 1000)}`;
    log(result.error);
  })
  .then(async () => {
    if (page && args.screenshot && !fs.existsSync(args.screenshot)) {
      try { await Promise.race([page.screenshot({ path: args.screenshot }), sleep(3000)]); } catch (e) { /* best effort */ }
    }
    if (!result.viewports.length && page) {
      try { await Promise.race([collect(null), sleep(3000)]); } catch (e) { /* best effort */ }
    }
  })
  .finally(async () => {
    clearTimeout(watchdog);
    emit(result.ok ? 0 : 1);
    if (browser) {
      const proc = browser.process();
      await Promise.race([browser.close().catch(() => {}), sleep(5000)]);
      try { if (proc && proc.exitCode === null) proc.kill('SIGKILL'); } catch (e) { /* gone */ }
      log('browser closed');
    }
    process.exit(process.exitCode); // no lingering timers (stdout to a pipe is synchronous on Linux)
  });
