// An admin's session on ainode's results page in headless Chromium: log in, find the study, open it,
// re-analyse it and watch the new revision arrive. Run by tests/test_webpage.py with
// NODE_PATH=<cache>/node_modules and $WEB_ARGS = {base, user, password, study, shots, chromium, timeoutMs}.
// Prints one JSON object as the last line of stdout: ok, error, listed, score, revision_before, pipeline,
// image (the result image loaded), report (the SR in words), revision_after, state_after, message, shots
// (paths). Every wait is bounded.
'use strict';

const puppeteer = require('puppeteer-core');

const args = JSON.parse(process.env.WEB_ARGS || '{}');
const t0 = Date.now();
const deadline = t0 + (args.timeoutMs || 100000);
const log = (...a) => process.stderr.write(`[admin_session +${Date.now() - t0}ms] ${a.join(' ')}\n`);
const result = {ok: false, error: null, listed: false, score: null, revision_before: null, revision_after: null,
                state_after: null, message: null, shots: []};
const done = code => { process.stdout.write(JSON.stringify(result) + '\n'); process.exit(code); };
setTimeout(() => { result.error = result.error || 'watchdog: out of time'; done(3); }, deadline - t0).unref();

(async () => {
  const browser = await puppeteer.launch({executablePath: args.chromium, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1']});
  try {
    const page = await browser.newPage();
    await page.setViewport({width: 1280, height: 800});
    const shot = async name => { const p = `${args.shots}/${name}.png`; await page.screenshot({path: p, fullPage: true});
                                 result.shots.push(p); };
    const text = async sel => page.$eval(sel, e => e.textContent.trim()).catch(() => null);
    log('login');
    await page.goto(`${args.base}/login`, {waitUntil: 'load', timeout: 20000});
    await page.type('input[name=user]', args.user);
    await page.type('input[name=password]', args.password);
    await Promise.all([page.waitForNavigation({timeout: 20000}), page.click('#login')]);
    await shot('web-studies');
    const link = `a[href="/studies/${args.study}"]`;
    result.listed = (await page.$(link)) !== null;
    if (!result.listed) throw new Error('the study is not in the list');
    await Promise.all([page.waitForNavigation({timeout: 20000}), page.click(link)]);
    result.score = await text('#score');
    result.revision_before = await text('#revision');
    result.pipeline = await text('#pipeline');
    await page.waitForFunction(() => { const i = document.querySelector('#summary');
                                       return i && i.complete && i.naturalWidth > 0; }, {timeout: 20000})
      .then(() => { result.image = true; }).catch(() => { result.image = false; });
    await shot('web-study');
    log('the SR in words');
    await Promise.all([page.waitForNavigation({timeout: 20000}), page.click('#report')]);
    result.report = await text('#sr');
    await shot('web-report');
    await Promise.all([page.waitForNavigation({timeout: 20000}), page.goBack()]);
    log('re-analyse');
    await Promise.all([page.waitForNavigation({timeout: 20000}), page.click('#reanalyse')]);
    result.message = await text('#message');
    while (Date.now() < deadline - 5000) {  // the new revision: queued, analysed, then sent
      result.revision_after = await text('#revision');
      result.state_after = await text('#state');
      if (result.revision_after === 'revision 2' && result.state_after === 'sent') break;
      await new Promise(r => setTimeout(r, 1000));
      await page.reload({waitUntil: 'load', timeout: 20000});
    }
    await shot('web-study-reanalysed');
    result.ok = result.revision_after === 'revision 2' && result.state_after === 'sent';
    if (!result.ok) result.error = `after re-analyse: ${result.revision_after}, ${result.state_after}`;
  } catch (e) {
    result.error = String(e && e.message || e);
  } finally {
    await browser.close().catch(() => {});
  }
  done(result.ok ? 0 : 1);
})();
