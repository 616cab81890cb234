// Drives OHIF's MONAI Label panel in Debian's headless Chromium (playwright-core, no browser download):
// open a study, connect the panel to the server, pick a label, click two opposite corners of a box
// on the shown slice, run `medsam`, and record what the viewer then holds.
//
//   node ohif_medsam.js SERVER_URL PATIENT_NAME "I0,J0,I1,J1" LABEL OUT_DIR [HIDE]
//
// HIDE: a window.cornerstoneTools export to hide from the page (the box tool must then step aside).
// Writes OUT_DIR/result.json (the infer request's params, the reply's status, the segmentation's
// voxel count in the viewer, the clicks on screen) and screenshots ohif-clicks.png, ohif-medsam.png.
'use strict';

const path = require('path');
const lib = require('./ohif_lib');

const [serverUrl, patient, boxText, label, outDir, hide] = process.argv.slice(2);
const box = boxText.split(',').map(Number);
const server = serverUrl.replace(/\/?$/, '/');

async function main() {
  const result = {};
  await lib.withBrowser(outDir, result, async (page) => {
    result.models = await lib.openPointPrompts(page, server, patient, label);
    result.clicks = [];
    for (const [i, j] of [[box[0], box[1]], [box[2], box[3]]]) {
      const at = await lib.voxelToPage(page, i, j);
      await page.mouse.click(at.x, at.y);
      result.clicks.push(at);
      await page.waitForTimeout(300);
    }
    await page.screenshot({ path: path.join(outDir, 'ohif-clicks.png') });
    result.voxels_before = await lib.segmentationVoxels(page);
    const run = () => lib.pointPromptsTab(page).locator('button.actionButton').click();
    Object.assign(result, await lib.nextInfer(page, run, path.join(outDir, 'reply.nrrd')));
    await page.waitForFunction(() => window.services.segmentationService.getSegmentations().length > 0,
      null, { timeout: 120000 });
    await page.waitForTimeout(2000); // let the viewport draw the overlay
    result.voxels_after = await lib.segmentationVoxels(page);
    await page.screenshot({ path: path.join(outDir, 'ohif-medsam.png') });
    result.box_tool = await page.evaluate(() => Boolean(window.medsamBox && window.medsamBox.engaged.size));
  }, hide);
}

main().catch((err) => { console.error(err); process.exit(1); });
