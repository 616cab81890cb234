// Drives the MedSAM box tool (apps/medsam/ohif/medsam-box.js) in OHIF's MONAI Label panel, in Debian's
// headless Chromium: pick a label, drag a rectangle on the shown slice (the panel runs `medsam` by
// itself), scroll STEP slices, drag the same rectangle there (a key-slice request), Clear Points, then
// drag a rectangle on the coronal view (refused: MedSAM segments the series' slices).
//
//   node ohif_box.js SERVER_URL PATIENT_NAME "I0,J0,I1,J1" LABEL "I,J" STEP OUT_DIR
//
// After the first rectangle it picks `background`, clicks voxel (I, J), picks LABEL again and
// presses Run (a refinement). Writes OUT_DIR/result.json (each drag on screen and in voxels, each
// infer request's params and reply status, the segmentation's voxel count in the viewer, tool modes,
// annotation counts), reply-1.nrrd, reply-refine.nrrd, reply-2.nrrd and screenshots ohif-box-1.png,
// ohif-box-2.png.
'use strict';

const path = require('path');
const lib = require('./ohif_lib');

const [serverUrl, patient, boxText, label, backgroundText, stepText, outDir] = process.argv.slice(2);
const box = boxText.split(',').map(Number);
const background = backgroundText.split(',').map(Number);
const step = Number(stepText);
const server = serverUrl.replace(/\/?$/, '/');

async function drag(page, from, to) {
  await page.mouse.move(from.x, from.y);
  await page.mouse.down();
  for (let n = 1; n <= 10; n++) {
    await page.mouse.move(from.x + (to.x - from.x) * n / 10, from.y + (to.y - from.y) * n / 10);
  }
  await page.mouse.up();
}

// Annotations per tool name (the box tool's rectangles, the panel's probes).
async function annotationCounts(page) {
  return page.evaluate(() => {
    const manager = window.cornerstoneTools.annotation.state.getAnnotationManager();
    const counts = {};
    for (const name of ['MedSAMBox', 'ProbeMONAILabel']) {
      counts[name] = (manager.getAllAnnotations ? manager.getAllAnnotations() : [])
        .filter((a) => a.metadata.toolName === name).length;
    }
    return counts;
  });
}

// Tool modes in the viewport's tool group.
async function toolModes(page) {
  return page.evaluate(() => {
    const { viewport } = window.cornerstone.getEnabledElements()[0];
    const group = window.cornerstoneTools.ToolGroupManager.getToolGroupForViewport(viewport.id);
    const mode = (name) => (group && group.toolOptions[name] ? group.toolOptions[name].mode : null);
    return { MedSAMBox: mode('MedSAMBox'), ProbeMONAILabel: mode('ProbeMONAILabel') };
  });
}

async function dragAndInfer(page, result, n) {
  const from = await lib.voxelToPage(page, box[0], box[1]);
  const to = await lib.voxelToPage(page, box[2], box[3]);
  const before = await lib.segmentationVoxels(page);
  const infer = await lib.nextInfer(page, () => drag(page, from, to), path.join(outDir, `reply-${n}.nrrd`));
  const voxels = await lib.settledVoxels(page, before);
  await page.waitForTimeout(1500); // let the viewport draw the overlay
  await page.screenshot({ path: path.join(outDir, `ohif-box-${n}.png`) });
  result.drags.push({ from, to, k: from.k, voxels_before: before, voxels_after: voxels, ...infer });
}

async function main() {
  const result = { drags: [] };
  await lib.withBrowser(outDir, result, async (page) => {
    const inferRequests = [];
    page.on('request', (r) => { if (r.url().includes('/infer/')) inferRequests.push(r.url()); });
    result.models = await lib.openPointPrompts(page, server, patient, label);
    await page.waitForFunction(() => window.medsamBox && window.medsamBox.engaged.size > 0, null, { timeout: 30000 });
    result.modes = await toolModes(page);
    result.usage = await page.locator('#medsam-box-usage').textContent({ timeout: 10000 });

    await dragAndInfer(page, result, 1);
    result.annotations_after_first = await annotationCounts(page);

    // Refine with a background click, as with the panel's probe alone.
    await page.getByRole('cell', { name: 'background', exact: true }).click();
    await page.waitForFunction(() => !window.medsamBox.engaged.size, null, { timeout: 10000 });
    result.modes_background = await toolModes(page);
    const at = await lib.voxelToPage(page, background[0], background[1]);
    await page.mouse.click(at.x, at.y);
    await page.waitForTimeout(500);
    await page.getByRole('cell', { name: label, exact: true }).click();
    await page.waitForFunction(() => window.medsamBox.engaged.size > 0, null, { timeout: 10000 });
    await page.waitForTimeout(500);
    result.annotations_label_again = await annotationCounts(page);
    const before = await lib.segmentationVoxels(page);
    const run = () => lib.pointPromptsTab(page).locator('button.actionButton').click();
    result.refine = await lib.nextInfer(page, run, path.join(outDir, 'reply-refine.nrrd'));
    result.refine.voxels_after = await lib.settledVoxels(page, before, 30000);

    await page.evaluate((delta) => { // scroll the first viewport by `delta` slices, as the mouse wheel does
      const { viewport } = window.cornerstone.getEnabledElements()[0];
      window.cornerstone.utilities.scroll(viewport, { delta });
    }, step);
    await page.waitForTimeout(1000);
    await dragAndInfer(page, result, 2);
    result.annotations_after_second = await annotationCounts(page);

    await lib.pointPromptsTab(page).getByText('Clear Points', { exact: true }).click();
    await page.waitForTimeout(500);
    result.annotations_after_clear = await annotationCounts(page);
    result.modes_after_clear = await toolModes(page);

    // A rectangle on another plane (the coronal view): refused with a notification, no request.
    const coronal = await page.evaluate(() => {
      const { viewport } = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === 'mpr-coronal');
      window.services.viewportGridService.setActiveViewportId(viewport.id);
      const rect = viewport.canvas.getBoundingClientRect();
      return { x: rect.x + rect.width * 0.3, y: rect.y + rect.height / 2 - 8, width: rect.width };
    });
    await page.waitForTimeout(500);
    await drag(page, coronal, { x: coronal.x + coronal.width * 0.4, y: coronal.y + 16 });
    await page.waitForTimeout(1000);
    result.other_plane = {
      notification: await page.getByText('MedSAM segments those slices', { exact: false }).count(),
      annotations: await annotationCounts(page),
    };
    result.infer_requests = inferRequests.length;
  });
}

main().catch((err) => { console.error(err); process.exit(1); });
