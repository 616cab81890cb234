// Drives OHIF's MONAI Label panel in Debian's headless Chromium (playwright-core, no browser download):
// open a study, connect the panel to the server, pick a label, click two opposite corners of a box
// on the shown slice, run `medsam`, and record what the viewer then holds.
//
//   node ohif_medsam.js SERVER_URL PATIENT_NAME "I0,J0,I1,J1" LABEL OUT_DIR
//
// Writes OUT_DIR/result.json (the infer request's params, the reply's status, the segmentation's
// voxel count in the viewer, the clicks on screen) and screenshots ohif-clicks.png, ohif-medsam.png.
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const [serverUrl, patient, boxText, label, outDir] = process.argv.slice(2);
const box = boxText.split(',').map(Number);
const server = serverUrl.replace(/\/?$/, '/');
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];

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

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  const result = { console_errors: [] };
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  try {
    page.on('console', (m) => { if (m.type() === 'error') result.console_errors.push(m.text().slice(0, 300)); });
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
    result.models = await page.locator('div.tab', { has: page.locator('#tab-3') }).locator('select option').allTextContents();
    await page.getByRole('cell', { name: label, exact: true }).click();

    result.clicks = [];
    for (const [i, j] of [[box[0], box[1]], [box[2], box[3]]]) {
      const at = await voxelToPage(page, i, j);
      await page.mouse.click(at.x, at.y);
      result.clicks.push(at);
      await page.waitForTimeout(300);
    }
    await page.screenshot({ path: path.join(outDir, 'ohif-clicks.png') });
    result.voxels_before = await segmentationVoxels(page);

    const reply = page.waitForResponse((r) => r.url().includes('/infer/') && r.request().method() === 'POST',
      { timeout: 300000 });
    await page.locator('div.tab', { has: page.locator('#tab-3') }).locator('button.actionButton').click();
    const response = await reply;
    result.request_url = response.url();
    const body = response.request().postData() || '';
    const json = body.slice(body.indexOf('{'), body.lastIndexOf('}') + 1);
    result.params = JSON.parse(json);
    result.status = response.status();
    fs.writeFileSync(path.join(outDir, 'reply.nrrd'), await response.body());
    await page.waitForFunction(() => window.services.segmentationService.getSegmentations().length > 0,
      null, { timeout: 120000 });
    await page.waitForTimeout(2000); // let the viewport draw the overlay
    result.voxels_after = await segmentationVoxels(page);
    await page.screenshot({ path: path.join(outDir, 'ohif-medsam.png') });
  } catch (err) {
    result.error = String(err);
    await page.screenshot({ path: path.join(outDir, 'ohif-failure.png') }).catch(() => {});
    throw err;
  } finally {
    fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify(result, null, 2));
    await browser.close();
  }
}

main().catch((err) => { console.error(err); process.exit(1); });
