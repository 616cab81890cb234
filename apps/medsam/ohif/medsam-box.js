// MedSAM box prompts in OHIF's MONAI Label panel: drag a rectangle, get the mask.
//
// Served after OHIF's app-config.js (apps/medsam/lib/endpoints/ohif_box.py): OHIF cannot be rebuilt
// here, so this is a runtime addition that uses cornerstone3D's public tool and annotation API.
// Written for the OHIF bundled with monailabel 0.8.5 (OHIF 3.10.0-beta.5, its @cornerstonejs/tools
// exposed as window.cornerstoneTools, MONAI Label's ProbeMONAILabel tool and Point Prompts panel).
//
// With `medsam` chosen under Point Prompts and an organ picked, the primary mouse button draws a
// rectangle (tool MedSAMBox, a RectangleROITool) instead of placing a probe. A finished rectangle
// on the series' slice plane becomes two ProbeMONAILabel points at its opposite corners (what the
// panel sends as `foreground` clicks and the server reads as a box) and the panel's Run is pressed:
// rectangles on several slices make the key-slice (3D) request. A click (no drag) places one probe,
// as before, so the corner-click flow is unchanged; with `background` picked, the panel's own probe
// is active. A rectangle is shown while its corner points exist: the panel's Clear Points removes
// both, and picking another label hides them until the label is picked again.
// If the APIs are not there, one console line says so and the panel works as without this script.
(function medsamBox() {
  'use strict';

  const TOOL = 'MedSAMBox';
  const PROBE = 'ProbeMONAILabel';
  const MODEL = 'medsam';
  const CLICK_PX = 4; // a drag smaller than this (screen pixels) is a click
  const POLL_MS = 300;
  const NOTE_ID = 'medsam-box-usage';
  const RUN_TRIES = 3; // presses of Run that started no request before giving up
  const USAGE = 'MedSAM: pick an organ, then drag a rectangle around it on the axial view (the ' +
    'series\' own slices): its mask appears. Rectangles on more slices of one object give a 3D mask ' +
    'between them. Or click two opposite corners and Run. To refine, pick background, click, pick ' +
    'the organ again and Run. Clear Points removes rectangles and points.';

  const log = (message) => console.warn(`[medsam-box] ${message}`);

  // --- infer requests in flight (the panel ignores Run while its last run is busy) -------------------
  const infers = { inFlight: 0, started: 0, ended: 0 };
  function watchInfers() { // the panel's client (axios) sends with XMLHttpRequest
    const open = XMLHttpRequest.prototype.open;
    const send = XMLHttpRequest.prototype.send;
    XMLHttpRequest.prototype.open = function openWatched(method, url, ...rest) {
      this.medsamInfer = String(url).includes('/infer/');
      return open.call(this, method, url, ...rest);
    };
    XMLHttpRequest.prototype.send = function sendWatched(...args) {
      if (this.medsamInfer) {
        infers.inFlight++;
        infers.started = Date.now();
        this.addEventListener('loadend', () => { infers.inFlight--; infers.ended = Date.now(); });
      }
      return send.apply(this, args);
    };
  }

  // --- the panel, read from its DOM (its React state is not exposed) --------------------------------
  function pointPromptsTab() {
    const label = [...document.querySelectorAll('label.tab-label')].find((l) => l.textContent.trim() === 'Point Prompts');
    return label ? label.closest('div.tab') : null;
  }

  function panelState() {
    const tab = pointPromptsTab();
    if (!tab) return null;
    const select = tab.querySelector('select');
    const picked = [...tab.querySelectorAll('tr.clickable-row')].find((row) =>
      row.style.backgroundColor === 'darkblue' || row.style.backgroundColor === 'darkred');
    return {
      tab,
      model: select ? select.value.trim() : '',
      label: picked ? picked.textContent.trim() : null,
      run: tab.querySelector('button.actionButton'),
    };
  }

  function showUsage(state) {
    const existing = document.getElementById(NOTE_ID);
    if (state && state.model === MODEL) {
      if (existing) return;
      const usage = [...state.tab.querySelectorAll('p')].find((p) => p.textContent.includes('foreground clicks'));
      if (!usage) return;
      const note = document.createElement('p');
      note.id = NOTE_ID;
      note.textContent = USAGE;
      note.style.color = '#5acce6';
      usage.parentNode.insertBefore(note, usage);
    } else if (existing) {
      existing.remove();
    }
  }

  // Press the panel's Run once no earlier run is busy; pressed again (up to RUN_TRIES times) until
  // an infer request starts.
  const run = { wanted: 0, pressed: 0, presses: 0 };
  function requestRun() {
    Object.assign(run, { wanted: Date.now(), presses: 0 });
  }
  function pressRunWhenFree(state) {
    if (!run.wanted || !state || !state.run) return;
    if (infers.started >= run.wanted) { run.wanted = 0; return; } // the run we asked for has started
    if (infers.inFlight > 0 || Date.now() - infers.ended < 1000) return; // the panel is still drawing the last result
    if (Date.now() - run.pressed < 1500) return;
    if (run.presses === RUN_TRIES) {
      run.wanted = 0;
      notify('The panel did not run medsam for the rectangle: press Run.');
      return;
    }
    Object.assign(run, { pressed: Date.now(), presses: run.presses + 1 });
    state.run.click();
  }

  function notify(message) {
    const service = window.services && window.services.uiNotificationService;
    if (service) service.show({ title: 'MedSAM', message, type: 'warning', duration: 6000 });
    else log(message);
  }

  function start(cs, cst) {
    const { annotation, Enums } = cst;
    const { Active, Passive, Disabled } = Enums.ToolModes;

    class MedSAMBoxTool extends cst.RectangleROITool {
      constructor(toolProps = {}, defaultToolProps = undefined) {
        super(toolProps, defaultToolProps);
        this.configuration.getTextLines = () => []; // no stats box: the rectangle is a prompt, not a measurement
        const addNewAnnotation = this.addNewAnnotation;
        this.addNewAnnotation = (evt) => {
          this.lastElement = evt.detail.element;
          return addNewAnnotation(evt);
        };
        // A click without drag would leave cornerstone3D's rectangle drawing until a second click
        // (its click-move-click mode); end it as a (zero-size) rectangle, which becomes a probe.
        const endCallback = this._endCallback;
        if (typeof endCallback === 'function') {
          this._endCallback = (evt) => {
            if (this.editData && this.editData.newAnnotation) this.editData.hasMoved = true;
            return endCallback(evt);
          };
        }
      }
    }
    MedSAMBoxTool.toolName = TOOL;
    cst.addTool(MedSAMBoxTool);
    watchInfers();

    function addProbe(rectangle, world) {
      const probe = {
        annotationUID: cs.utilities.uuidv4(),
        invalidated: true,
        highlighted: false,
        metadata: { ...rectangle.metadata, toolName: PROBE },
        data: { label: '', handles: { points: [[...world]], activeHandleIndex: null, textBox: { hasMoved: false } },
          cachedStats: {} },
      };
      return annotation.state.addAnnotation(probe, rectangle.metadata.FrameOfReferenceUID);
    }

    // A rectangle lives as long as its two corner points: the panel removes every annotation when
    // another label is picked and restores that label's points when it is picked again.
    const rectangles = new Map(); // label -> [{ rectangle, probes: [uid, uid] }]
    function keepRectanglesWithTheirPoints(label) {
      const kept = (rectangles.get(label) || []).filter(({ rectangle, probes }) => {
        const present = Boolean(annotation.state.getAnnotation(rectangle.annotationUID));
        if (probes.every((uid) => annotation.state.getAnnotation(uid))) {
          if (!present) annotation.state.addAnnotation(rectangle, rectangle.metadata.FrameOfReferenceUID);
          return true;
        }
        if (present) annotation.state.removeAnnotation(rectangle.annotationUID);
        return false;
      });
      if (kept.length !== (rectangles.get(label) || []).length) {
        window.services.cornerstoneViewportService.getRenderingEngine().render();
      }
      rectangles.set(label, kept);
    }

    function onCompleted(evt) {
      const rectangle = evt.detail && evt.detail.annotation;
      if (!rectangle || rectangle.metadata.toolName !== TOOL) return;
      const tool = cst.ToolGroupManager.getAllToolGroups().filter((g) => g.hasTool(TOOL))
        .map((g) => g.getToolInstance(TOOL)).find((t) => t.lastElement && t.lastElement.isConnected);
      const enabled = tool && cs.getEnabledElement(tool.lastElement);
      const points = rectangle.data.handles.points;
      if (!enabled) return;
      const { viewport } = enabled;
      const [a, b] = [viewport.worldToCanvas(points[0]), viewport.worldToCanvas(points[3])];
      if (Math.abs(a[0] - b[0]) < CLICK_PX || Math.abs(a[1] - b[1]) < CLICK_PX) {
        annotation.state.removeAnnotation(rectangle.annotationUID);
        addProbe(rectangle, points[0]); // a click: one point, as the panel's probe places it
      } else {
        // The server reads boxes on the series' slices: the view must face along the series' k axis
        // (within 25 degrees: OHIF shows an oblique series on the nearest axial, sagittal or coronal plane).
        const { imageData } = viewport.getImageData();
        const index = points.map((p) => imageData.worldToIndex(p));
        const [origin, next] = [imageData.indexToWorld([0, 0, 0]), imageData.indexToWorld([0, 0, 1])];
        const kAxis = [0, 1, 2].map((d) => next[d] - origin[d]);
        const normal = rectangle.metadata.viewPlaneNormal;
        const facing = Math.abs(kAxis.reduce((sum, v, d) => sum + v * normal[d], 0)) / Math.hypot(...kAxis) / Math.hypot(...normal);
        if (!(facing > 0.9)) {
          annotation.state.removeAnnotation(rectangle.annotationUID);
          notify('Draw the rectangle on the view that shows the series\' own slices (axial for a CT): ' +
            'MedSAM segments those slices.');
        } else {
          if (annotation.locking && annotation.locking.setAnnotationLocked) { // the next rectangle must not move this one
            annotation.locking.setAnnotationLocked(rectangle.annotationUID, true);
          }
          // Both corners on one slice k, also where the view cuts an oblique series' slices at an angle.
          const k = Math.round((index[0][2] + index[3][2]) / 2);
          const corner = (n) => imageData.indexToWorld([index[n][0], index[n][1], k]);
          const probes = [addProbe(rectangle, corner(0)), addProbe(rectangle, corner(3))];
          const { label } = panelState() || {};
          rectangles.set(label, [...(rectangles.get(label) || []), { rectangle, probes }]);
          requestRun();
        }
      }
      viewport.getRenderingEngine().render();
    }
    cs.eventTarget.addEventListener(Enums.Events.ANNOTATION_COMPLETED, onCompleted);

    // Swap the panel's probe and the rectangle tool on the primary button as the panel's state changes.
    const engaged = new Set();
    const primary = [{ mouseButton: Enums.MouseBindings.Primary }];
    function sync() {
      const state = panelState();
      showUsage(state);
      pressRunWhenFree(state);
      if (state && state.label) keepRectanglesWithTheirPoints(state.label);
      const wanted = Boolean(state && state.model === MODEL && state.label && state.label !== 'background');
      for (const group of cst.ToolGroupManager.getAllToolGroups()) {
        const probe = group.toolOptions[PROBE];
        if (!probe) continue;
        if (!group.hasTool(TOOL)) group.addTool(TOOL);
        const mine = group.toolOptions[TOOL] || { mode: Disabled }; // no options until a mode is set
        if (!engaged.has(group.id)) {
          if (wanted && probe.mode === Active) {
            group.setToolPassive(PROBE);
            group.setToolActive(TOOL, { bindings: primary });
            engaged.add(group.id);
          } else if (probe.mode === Disabled && mine.mode !== Disabled) {
            group.setToolDisabled(TOOL); // the panel's Point Prompts are closed: hide rectangles with the points
          } else if (probe.mode !== Disabled && mine.mode === Disabled) {
            group.setToolPassive(TOOL);
          }
          continue;
        }
        if (probe.mode === Disabled) { // the panel left Point Prompts
          group.setToolDisabled(TOOL);
          engaged.delete(group.id);
        } else if (mine.mode !== Active) { // another tool took the mouse: leave it
          engaged.delete(group.id);
        } else if (!wanted) { // another model, background, or no label: the panel's probe again
          group.setToolPassive(TOOL);
          group.setToolActive(PROBE, { bindings: primary });
          engaged.delete(group.id);
        }
      }
    }
    const syncing = setInterval(() => {
      try {
        sync();
      } catch (err) {
        clearInterval(syncing);
        for (const group of cst.ToolGroupManager.getAllToolGroups().filter((g) => engaged.has(g.id))) {
          group.setToolPassive(TOOL);
          group.setToolActive(PROBE, { bindings: primary });
        }
        log(`box prompts stopped (${err}); the panel's clicks work as before`);
      }
    }, POLL_MS);
    window.medsamBox = { tool: TOOL, engaged, infers };
  }

  // Wait for OHIF to expose cornerstone3D and register the MONAI Label probe, then check the API.
  const waited = setInterval(() => {
    const cs = window.cornerstone;
    const cst = window.cornerstoneTools;
    if (!cs || !cst) return;
    clearInterval(waited);
    const missing = [
      ['cornerstoneTools.RectangleROITool', cst.RectangleROITool],
      ['cornerstoneTools.addTool', cst.addTool],
      ['cornerstoneTools.ToolGroupManager.getAllToolGroups', cst.ToolGroupManager && cst.ToolGroupManager.getAllToolGroups],
      ['cornerstoneTools.annotation.state.addAnnotation', cst.annotation && cst.annotation.state && cst.annotation.state.addAnnotation],
      ['cornerstoneTools.annotation.state.removeAnnotation', cst.annotation && cst.annotation.state && cst.annotation.state.removeAnnotation],
      ['cornerstoneTools.annotation.state.getAnnotation', cst.annotation && cst.annotation.state && cst.annotation.state.getAnnotation],
      ['cornerstone.utilities.uuidv4', cs.utilities && cs.utilities.uuidv4],
      ['cornerstoneTools.Enums.Events.ANNOTATION_COMPLETED', cst.Enums && cst.Enums.Events && cst.Enums.Events.ANNOTATION_COMPLETED],
      ['cornerstone.eventTarget', cs.eventTarget],
      ['cornerstone.getEnabledElement', cs.getEnabledElement],
    ].filter(([, value]) => !value).map(([name]) => name);
    if (missing.length) {
      log(`box prompts off (this OHIF lacks ${missing.join(', ')}); the panel's clicks work as before`);
      return;
    }
    try {
      start(cs, cst);
    } catch (err) {
      log(`box prompts off (${err}); the panel's clicks work as before`);
    }
  }, POLL_MS);
})();
