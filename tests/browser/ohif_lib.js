// What the OHIF browser drivers share (ohif_medsam.js: clicks; ohif_box.js: rectangles): launch
// Debian's Chromium, open a study in OHIF's MONAI Label mode, connect the panel, read the viewer.
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];

async function launch() {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  return { browser, page };
}

// Console lines of the page: errors, and the box tool's own lines ("[medsam-box] ...").
function recordConsole(page, result) {
  result.console_errors = [];
  result.console_medsam = [];
  page.on('console', (m) => {
    if (m.type() === 'error') result.console_errors.push(m.text().slice(0, 300));
    if (m.text().startsWith('[medsam-box]')) result.console_medsam.push(m.text().slice(0, 300));
  });
}

// Open the patient's study in the MONAI Label mode, wait for the series, connect the panel to the
// server and open Point Prompts with `label` picked. Returns the models Point Prompts lists.
async function openPointPrompts(page, server, patient, label) {
  await page.goto(new URL('ohif/', server).toString(), { waitUntil: 'load', timeout: 120000 });
  await page.getByText('Confirm and Hide').click({ timeout: 120000 });
  await page.locator('span.truncate', { hasText: patient }).click({ timeout: 120000 });
  await page.getByRole('button', { name: 'MONAI Label' }).click();

  // Connect only once the series is loaded: the panel sets up its label segmentation on the
  // displayed volume when it connects ("Something went wrong" when there is none yet).
  await page.waitForFunction(() => {
    const element = window.cornerstone.getEnabledElements()[0];
    const volumes = window.cornerstone.cache.getVolumes();
    return element && element.viewport.getImageData && element.viewport.getImageData() &&
      volumes.length > 0 && volumes.every((v) => v.loadStatus && v.loadStatus.loaded);
  }, null, { timeout: 180000 });

  // The panel's server field starts at http://127.0.0.1:8000/; the round button beside it connects.
  const field = page.locator('input[value="http://127.0.0.1:8000/"]');
  await field.fill(server, { timeout: 120000 });
  await page.locator('button.actionButton').first().click();
  await page.getByText('Point Prompts').click({ timeout: 120000 });
  const models = await pointPromptsTab(page).locator('select option').allTextContents();
  await page.getByRole('cell', { name: label, exact: true }).click();
  return models;
}

function pointPromptsTab(page) {
  return page.locator('div.tab', { has: page.locator('#tab-3') });
}

// Screen position (page pixels) of voxel (i, j) on the slice shown in the first viewport, through
// cornerstone's own index -> world -> canvas transforms; also returns that slice's index k.
async function voxelToPage(page, i, j) {
  return page.evaluate(([i, j]) => {
    const viewport = window.cornerstone.getEnabledElements()[0].viewport;
    const { imageData } = viewport.getImageData();
    const k = Math.round(imageData.worldToIndex(viewport.getCamera().focalPoint)[2]);
    const [x, y] = viewport.worldToCanvas(imageData.indexToWorld([i, j, k]));
    const rect = viewport.canvas.getBoundingClientRect();
    return { x: rect.x + x, y: rect.y + y, k, canvas: [rect.x, rect.y, rect.width, rect.height] };
  }, [i, j]);
}

// Voxels set in the viewer's labelmap segmentations (what OHIF shows as the result).
async function segmentationVoxels(page) {
  return page.evaluate(() => {
    const { segmentationService } = window.services;
    let total = 0;
    for (const segmentation of segmentationService.getSegmentations()) {
      const volume = segmentationService.getLabelmapVolume(segmentation.segmentationId || segmentation.id);
      if (!volume) continue;
      const data = volume.voxelManager ? volume.voxelManager.getCompleteScalarDataArray() : volume.getScalarData();
      for (let n = 0; n < data.length; n++) if (data[n]) total++;
    }
    return total;
  });
}

// The next POST /infer/ reply, with its request's params (the JSON in the multipart body).
async function nextInfer(page, trigger, outFile) {
  const reply = page.waitForResponse((r) => r.url().includes('/infer/') && r.request().method() === 'POST',
    { timeout: 300000 });
  await trigger();
  const response = await reply;
  const body = response.request().postData() || '';
  const infer = {
    request_url: response.url(),
    params: JSON.parse(body.slice(body.indexOf('{'), body.lastIndexOf('}') + 1)),
    status: response.status(),
  };
  fs.writeFileSync(outFile, await response.body());
  return infer;
}

// Wait until the viewer's segmentation has changed from `before` voxels and stopped changing.
async function settledVoxels(page, before, timeoutMs = 120000) {
  const end = Date.now() + timeoutMs;
  let last = -1;
  for (;;) {
    const now = await segmentationVoxels(page).catch(() => -1);
    if (now !== before && now === last) return now;
    if (Date.now() > end) return now;
    last = now;
    await page.waitForTimeout(1000);
  }
}

// Make window.cornerstoneTools lack `name` (what an OHIF without that API looks like to the box tool).
function hideToolsExport(page, name) {
  return page.addInitScript((hidden) => {
    let tools;
    Object.defineProperty(window, 'cornerstoneTools', {
      configurable: true,
      get: () => tools,
      set: (value) => { tools = new Proxy(value, { get: (target, key) => (key === hidden ? undefined : target[key]) }); },
    });
  }, name);
}

// Run `body(page)` in a fresh browser; result.json is written whatever happens. `hide`: a
// cornerstoneTools export to hide from the page.
async function withBrowser(outDir, result, body, hide = '') {
  fs.mkdirSync(outDir, { recursive: true });
  const { browser, page } = await launch();
  recordConsole(page, result);
  if (hide) await hideToolsExport(page, hide);
  try {
    await body(page);
  } catch (err) {
    result.error = String(err);
    await page.screenshot({ path: path.join(outDir, 'ohif-failure.png') }).catch(() => {});
    throw err;
  } finally {
    fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify(result, null, 2));
    await browser.close();
  }
}

module.exports = { openPointPrompts, pointPromptsTab, voxelToPage, segmentationVoxels, nextInfer, settledVoxels,
  withBrowser };
