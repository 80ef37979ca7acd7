// msam viewer: open a volume, click on lesions, see their 3D masks (NiiVue).
//
// A volume opens an interactive session on the server; each click, box drag or re-run of an
// edited mask (brush: paint / erase) is an interaction of the lesion being edited, answered in
// its own response with the lesion's mask as a delta (no polling), applied to the lesion's
// overlay in place; undo is the server's. Saving (a download, or sending to PACS) commits the
// session: the outputs are written then, with every lesion (label n = lesion n).
// The console never gets file names, headers or API keys (no patient data in the page's logs).

import { Niivue, NVImage, SLICE_TYPE, SHOW_RENDER, DRAG_MODE } from '@niivue/niivue'
import * as api from './api.js'
import { affinesAgree, apply, brushVoxels, dragBox, viewAxes, fracToRAS, gridToRAS, headerAffine, invertAffine, rasToFrac, rasToVoxel, round } from './geometry.js'

// ---------------------------------------------------------------------------------------------
// window / level presets (width, level in HU; MR and unknown: robust range of the image)
export const PRESETS = {
  'ct-soft': { label: 'CT soft tissue (W400 L40)', w: 400, l: 40 },
  'ct-lung': { label: 'CT lung (W1500 L-600)', w: 1500, l: -600 },
  'ct-bone': { label: 'CT bone (W1800 L400)', w: 1800, l: 400 },
  'mr-auto': { label: 'MR / auto (robust range)', auto: true }
}
// one overlay per lesion, each its own colour map (a click updates its overlay in place)
const LESION_COLORMAPS = ['red', 'blue', 'violet', 'gold', 'copper', 'cool', 'warm', 'hot']
const LESION_CSS = ['#ff3030', '#3a6bff', '#c060ff', '#ffc430', '#d08050', '#30d0ff', '#ff9040', '#ffef60']
const OVERLAY_OPACITY = 0.5
const PEN_POSITIVE = 2 // ITK-SNAP draw colours: 2 green
const PEN_NEGATIVE = 4 //                         4 yellow
const PEN_BOX = 3 //                              3 blue: a lesion's box, on the slice it was dragged on
const PEN_LONG_AXIS = 5 //                        5 cyan: RECIST long axis
const PEN_SHORT_AXIS = 6 //                       6 magenta: short axis
const RECENT_KEY = 'msam.recentVolumes'
const CONVENTION_KEY = 'msam.convention'
const CLICK_SLOP_PX = 5
const TOOLS = ['click', 'box', 'paint', 'erase']
const MARKER_RADIUS_MM = 2

const $ = (id) => document.getElementById(id)
// text from the server (or a DICOM header) never goes into innerHTML unescaped
const esc = (v) => String(v).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c])

const state = {
  volume: null, // {volume_id, format, shape, spacing, affine_ras, modality, source}
  session: null, // the server's interactive session on the volume ({session_id, ...})
  // {n, serverN, acts: [{kind: 'point' | 'box' | 'mask', sent, ...}] (its interactions, in order;
  // `points`: those that are points), pendingEdit (brush strokes not re-run yet), overlay
  // (NVImage), voxels, ml, generation, shown, status}
  lesions: [],
  active: -1,
  tool: 'click', // click (points), box (drag a rectangle), paint / erase (brush on the mask)
  brush: 2, // brush radius, voxels of the slice shown
  nextLesion: 1,
  busy: 0,
  lastLatencyMs: null,
  lastBreakdown: null,
  lastJob: null,
  history: [] // [lesion n] order of interactions added, for undo across lesions
}

const nv = new Niivue({
  backColor: [0.06, 0.07, 0.09, 1],
  crosshairColor: [0.15, 0.75, 1, 0.5],
  crosshairWidth: 0.4,
  crosshairWidthUnit: 'mm',
  show3Dcrosshair: true,
  dragAndDropEnabled: false,
  multiplanarShowRender: SHOW_RENDER.ALWAYS,
  // as PACS shows CT and MR: the patient's left on the screen's right (axial, coronal), the
  // nose on the left (sagittal); the View section switches to the neurological convention
  isRadiologicalConvention: true,
  sagittalNoseLeft: true,
  logLevel: 'error',
  loadingText: '',
  isColorbar: false,
  mouseEventConfig: {
    leftButton: { primary: DRAG_MODE.crosshair, withShift: DRAG_MODE.crosshair, withCtrl: DRAG_MODE.crosshair },
    rightButton: DRAG_MODE.crosshair,
    centerButton: DRAG_MODE.pan
  }
})

// ---------------------------------------------------------------------------------------------
// messages and status

function say (text, kind = 'info') {
  const el = $('message')
  el.textContent = text
  el.className = kind
}

function setBusy (delta) {
  state.busy = Math.max(0, state.busy + delta)
  document.body.classList.toggle('busy', state.busy > 0)
}

function fmtS (s) {
  if (s === null || s === undefined) return '-'
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`
}

function showJob (job, latencyMs = null) {
  state.lastJob = job
  $('job-status').textContent = job ? `${job.status}${job.stage && job.stage !== job.status ? ' (' + job.stage + ')' : ''}` +
    (job.queue_position ? ` - position ${job.queue_position} in queue` : '') : '-'
  $('job-progress').value = job ? job.progress : 0
  const t = (job && job.timings) || {}
  const rows = ['queue', 'model_load', 'load', 'preprocess', 'encode', 'decode', 'write', 'total']
    .filter((k) => t[k] !== null && t[k] !== undefined)
    .map((k) => `<tr><td>${esc(k.replace('_', ' '))}</td><td>${esc(fmtS(Number(t[k])))}</td></tr>`)
  if (job) {
    const runs = Number(job.encoder_runs) || 0
    const hits = Number(job.cache_hits) || 0
    rows.push(`<tr><td>encoder</td><td>${runs ? runs + ' run' + (runs > 1 ? 's' : '') : 'cached'}` +
      `${hits ? ' (' + hits + ' cache hit' + (hits > 1 ? 's' : '') + ')' : ''}</td></tr>`)
  }
  if (latencyMs !== null) rows.push(`<tr class="latency"><td>click → overlay</td><td>${fmtS(latencyMs / 1000)}</td></tr>`)
  $('job-timings').innerHTML = rows.join('')
}

// ---------------------------------------------------------------------------------------------
// recent volumes (this browser only; no file names are stored)

function recentVolumes () {
  try { return JSON.parse(localStorage.getItem(RECENT_KEY) || '[]') } catch { return [] }
}

function rememberVolume (info) {
  const entry = {
    volume_id: info.volume_id, format: info.format, shape: info.shape, spacing: info.spacing,
    affine_ras: info.affine_ras, modality: info.modality, at: Date.now()
  }
  const list = [entry, ...recentVolumes().filter((v) => v.volume_id !== info.volume_id)].slice(0, 12)
  try { localStorage.setItem(RECENT_KEY, JSON.stringify(list)) } catch { /* full or disabled */ }
  renderRecent()
}

function forgetVolume (volumeId) {
  const list = recentVolumes().filter((v) => v.volume_id !== volumeId)
  try { localStorage.setItem(RECENT_KEY, JSON.stringify(list)) } catch { }
  renderRecent()
}

function renderRecent () {
  const sel = $('recent')
  const list = recentVolumes()
  sel.innerHTML = '<option value="">recent volumes…</option>' + list.map((v) => {
    const when = new Date(v.at).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' })
    return `<option value="${esc(v.volume_id)}">${esc(v.modality || v.format)} ${esc(v.shape.join('×'))} · ${esc(when)} · ${esc(v.volume_id.slice(0, 8))}</option>`
  }).join('')
  sel.disabled = list.length === 0
}

// ---------------------------------------------------------------------------------------------
// opening a volume

async function openFiles (files) {
  if (!files || files.length === 0) return
  files = Array.from(files)
  const single = files.length === 1 ? files[0] : null
  const isNifti = single && /\.nii(\.gz)?$/i.test(single.name)
  say('uploading…')
  setBusy(1)
  try {
    const info = await api.uploadVolume(files, (f) => { $('upload-progress').value = f })
    rememberVolume(info)
    let buffer = null
    let name = 'image.nii.gz'
    if (isNifti) {
      buffer = await single.arrayBuffer()
      name = api.safeName(single.name)
    }
    await showVolume(info, buffer, name)
  } catch (err) {
    say(`could not open the volume: ${err.message}`, 'error')
  } finally {
    $('upload-progress').value = 0
    setBusy(-1)
  }
}

async function openRecent (volumeId) {
  const info = recentVolumes().find((v) => v.volume_id === volumeId)
  if (!info) return
  say('loading…')
  setBusy(1)
  try {
    await showVolume(info, null)
  } catch (err) {
    if (err.status === 404) forgetVolume(volumeId)
    say(`could not open the volume: ${err.message}`, 'error')
  } finally {
    setBusy(-1)
  }
}

async function loadImage (buffer, name) {
  return NVImage.loadFromUrl({ url: name, buffer, name, colormap: 'gray' })
}

/** Show `info`'s image: the local NIfTI when its affine is the server's, else the server's own
 * decoded image (DICOM, NRRD, NIfTI whose header is read differently, recent volumes). */
async function showVolume (info, localBuffer, localName = 'image.nii.gz') {
  resetLesions(false)
  let image = null
  let source = 'server'
  if (localBuffer) {
    const candidate = await loadImage(localBuffer, localName)
    if (affinesAgree(headerAffine(candidate), info.affine_ras, info.shape)) {
      image = candidate
      source = 'local'
    }
  }
  if (!image) image = await loadImage(await api.getVolumeImage(info.volume_id), 'image.nii.gz')
  for (const v of [...nv.volumes]) nv.removeVolume(v)
  nv.addVolume(image)
  state.volume = { ...info, source }
  voxelOfRAS = invertAffine(info.affine_ras)
  state.session = await api.createSession(info.volume_id, 'RAS')
  nv.createEmptyDrawing()
  nv.setDrawOpacity(0.9)
  const ct = info.modality === 'CT' || (info.modality == null && image.global_min !== undefined && image.global_min < -500)
  $('preset').value = ct ? 'ct-soft' : 'mr-auto'
  applyPreset($('preset').value)
  newLesion()
  $('volume-info').textContent = `${info.modality || info.format} · ${info.shape.join(' × ')} voxels · ` +
    `${round(info.spacing, 2).join(' × ')} mm · ${info.volume_id.slice(0, 8)}`
  document.body.classList.add('has-volume')
  updateButtons()
  say('click on a lesion (left click: inside, shift+click or right click: outside), or drag a box around it (Box)')
}

function applyPreset (key) {
  const vol = nv.volumes[0]
  if (!vol) return
  const p = PRESETS[key]
  if (!p || p.auto) {
    vol.cal_min = vol.robust_min ?? vol.global_min
    vol.cal_max = vol.robust_max ?? vol.global_max
  } else {
    vol.cal_min = p.l - p.w / 2
    vol.cal_max = p.l + p.w / 2
  }
  nv.updateGLVolume()
}

// ---------------------------------------------------------------------------------------------
// lesions

function currentLesion () {
  return state.lesions[state.active] || null
}

function newLesion () {
  if (!state.volume) return
  const cur = currentLesion()
  if (cur && cur.acts.length === 0 && !cur.pendingEdit) return // reuse the empty one
  const n = state.nextLesion++
  state.lesions.push({
    n, label: `lesion ${n}`, acts: [], pendingEdit: null, overlay: null, voxels: 0, ml: 0, serverN: null, generation: 0, shown: 0, status: '',
    get points () { return this.acts.filter((a) => a.kind === 'point') }
  })
  state.active = state.lesions.length - 1
  renderLesions()
  updateButtons()
}

function resetLesions (render = true) {
  for (const lesion of state.lesions) dropOverlay(lesion)
  state.lesions = []
  state.active = -1
  state.nextLesion = 1
  state.history = []
  if (nv.drawBitmap) { nv.drawBitmap.fill(0); nv.refreshDrawing(true) }
  if (render) {
    newLesion()
    renderLesions()
    showJob(null)
  }
}

function dropOverlay (lesion) {
  if (lesion.overlay) {
    if (nv.volumes.includes(lesion.overlay)) nv.removeVolume(lesion.overlay)
    lesion.overlay = null
  }
}

function colourIndex (lesion) {
  return (lesion.n - 1) % LESION_COLORMAPS.length
}

function renderLesions () {
  const ul = $('lesions')
  ul.innerHTML = ''
  state.lesions.forEach((lesion, idx) => {
    const li = document.createElement('li')
    li.className = idx === state.active ? 'active' : ''
    li.dataset.lesion = String(lesion.n)
    const pos = lesion.points.filter((p) => p.positive).length
    const neg = lesion.points.length - pos
    const extra = (lesion.acts.some((a) => a.kind === 'box') ? ' □' : '') +
      (lesion.acts.some((a) => a.kind === 'mask') ? ' ✎' : '') + (lesion.pendingEdit ? '*' : '')
    li.innerHTML = `<span class="swatch" style="background:${LESION_CSS[colourIndex(lesion)]}"></span>` +
      `<span class="name">${esc(lesion.label)}</span>` +
      `<span class="pts" title="points, box, mask edits (*: brush strokes not re-run yet)">+${pos} −${neg}${extra}</span>` +
      `<span class="ml">${lesion.overlay || lesion.voxels ? lesion.ml.toFixed(2) + ' mL' : ''}</span>` +
      `<span class="axes" title="RECIST long x short axis (drawn on the slice where they lie)">${axesText(lesion)}</span>` +
      `<span class="st">${esc(lesion.status)}</span>` +
      '<button class="del" title="delete this lesion">×</button>'
    li.addEventListener('click', (e) => {
      if (e.target.classList.contains('del')) {
        deleteLesion(idx)
      } else {
        state.active = idx
        renderLesions()
        updateButtons()
      }
    })
    ul.appendChild(li)
  })
}

function axesText (lesion) {
  const m = lesion.measurements
  if (!m || !lesion.overlay) return ''
  return `${m.long_axis.length_mm.toFixed(1)} × ${m.short_axis.length_mm.toFixed(1)} mm`
}

async function deleteLesion (idx) {
  const lesion = state.lesions[idx]
  if (lesion.serverN != null && lesion.acts.some((p) => p.sent)) {
    // reset on the server first: a lesion still holding a mask there would be in the next save
    const sid = state.session.session_id
    lesion.status = 'deleting'
    renderLesions()
    try {
      await lesion.chain.catch(() => {})
      await api.resetLesion(sid, lesion.serverN)
    } catch (err) {
      lesion.status = 'error'
      renderLesions()
      say(`could not delete ${lesion.label}: ${err.message}; it is kept (and would be saved)`, 'error')
      return
    }
    idx = state.lesions.indexOf(lesion)
    if (idx < 0) return
  }
  dropOverlay(lesion)
  state.lesions.splice(idx, 1)
  state.history = state.history.filter((n) => n !== lesion.n)
  redrawMarkers()
  if (idx < state.active) state.active--
  state.active = Math.min(state.active, state.lesions.length - 1)
  if (state.lesions.length === 0) newLesion()
  renderLesions()
  updateButtons()
}

function updateButtons () {
  const has = !!state.volume
  const anyMask = state.lesions.some((l) => l.overlay)
  $('new-lesion').disabled = !has
  $('clear').disabled = !has || state.lesions.every((l) => l.acts.length === 0 && !l.pendingEdit)
  const cur = currentLesion()
  $('rerun').disabled = !has || !cur || !cur.pendingEdit
  $('undo').disabled = !has || (state.history.length === 0 && !(cur && cur.pendingEdit))
  $('dl-nifti').disabled = !anyMask
  $('dl-png').disabled = !anyMask
  $('send-pacs').disabled = !anyMask || !(state.volume && state.volume.format === 'dicom')
  $('dl-seg').disabled = !anyMask || !(state.volume && state.volume.format === 'dicom')
  $('dl-seg').title = state.volume && state.volume.format !== 'dicom' ? 'DICOM-SEG needs a DICOM input' : ''
}

// a measured axis (endpoints in LPS mm) drawn voxel by voxel into the drawing layer: it shows on
// the slice it was measured in
function drawAxis (bm, vol, axis, pen) {
  const d = vol.dimsRAS
  const ends = [axis.start_lps, axis.end_lps].map((p) => rasToFrac(vol, [-p[0], -p[1], p[2]]).map((f, n) => f * d[n + 1] - 0.5))
  const steps = Math.max(1, Math.ceil(2 * Math.max(...[0, 1, 2].map((n) => Math.abs(ends[1][n] - ends[0][n])))))
  for (let s = 0; s <= steps; s++) {
    const v = [0, 1, 2].map((n) => Math.round(ends[0][n] + (ends[1][n] - ends[0][n]) * s / steps))
    if (v.some((x, n) => x < 0 || x >= d[n + 1])) continue
    bm[v[0] + v[1] * d[1] + v[2] * d[1] * d[2]] = pen
  }
}

// the box in effect: its outline on the slice it was dragged on
function drawBoxOutline (bm, d, box) {
  const { plane: [a, b], through: c } = viewAxes(box.view)
  const v = [0, 0, 0]
  v[c] = box.slice
  for (let x = box.gridLo[a]; x <= box.gridHi[a]; x++) {
    for (let y = box.gridLo[b]; y <= box.gridHi[b]; y++) {
      if (x !== box.gridLo[a] && x !== box.gridHi[a] && y !== box.gridLo[b] && y !== box.gridHi[b]) continue
      v[a] = x
      v[b] = y
      bm[v[0] + v[1] * d[1] + v[2] * d[1] * d[2]] = PEN_BOX
    }
  }
}

// point markers live in NiiVue's drawing layer (same grid as the image: exact on every view)
function redrawMarkers () {
  const vol = nv.volumes[0]
  if (!vol || !nv.drawBitmap) return
  const bm = nv.drawBitmap
  bm.fill(0)
  const d = vol.dimsRAS
  const px = vol.pixDimsRAS || [1, 1, 1, 1]
  const r = [1, 2, 3].map((n) => Math.max(0, Math.floor(MARKER_RADIUS_MM / Math.abs(px[n] || 1))))
  for (const lesion of state.lesions) {
    for (const p of lesion.points) {
      const [x0, y0, z0] = p.rasVoxel
      for (let z = z0 - r[2]; z <= z0 + r[2]; z++) {
        for (let y = y0 - r[1]; y <= y0 + r[1]; y++) {
          for (let x = x0 - r[0]; x <= x0 + r[0]; x++) {
            if (x < 0 || y < 0 || z < 0 || x >= d[1] || y >= d[2] || z >= d[3]) continue
            bm[x + y * d[1] + z * d[1] * d[2]] = p.positive ? PEN_POSITIVE : PEN_NEGATIVE
          }
        }
      }
    }
    const box = lesion.acts.findLast((a) => a.kind === 'box')
    if (box) drawBoxOutline(bm, d, box)
    if (lesion.measurements && lesion.overlay) {
      drawAxis(bm, vol, lesion.measurements.long_axis, PEN_LONG_AXIS)
      drawAxis(bm, vol, lesion.measurements.short_axis, PEN_SHORT_AXIS)
    }
  }
  nv.refreshDrawing(true)
}

// ---------------------------------------------------------------------------------------------
// clicks -> session interactions -> overlays

/** Does the lesion have a prompt the server can start from (a positive point, a box or a mask)? */
function prompted (lesion) {
  return lesion.acts.some((a) => a.kind !== 'point' || a.positive)
}

/** Add an interaction (`act`: {kind, ...}) to the current lesion and send it (after the
 * lesion's earlier ones). */
function addAct (act, t0) {
  const lesion = currentLesion()
  if (!lesion || !state.volume || !state.session) return null
  if (lesion.pendingEdit && act.kind !== 'mask') {
    say('re-run the brush strokes first (or undo them)', 'error')
    return null
  }
  lesion.acts.push({ ...act, sent: false })
  state.history.push(lesion.n)
  lesion.generation++
  lesion.t0 = t0
  if (!prompted(lesion)) {
    lesion.status = 'needs a positive point' // kept here until a positive point comes
    lesion.shown = lesion.generation
  } else {
    enqueue(lesion, () => flush(lesion)) // sent before anything is redrawn (drawing can be slow)
  }
  redrawMarkers()
  renderLesions()
  updateButtons()
  return lesion
}

function addPoint (ras, rasVoxel, positive, t0) {
  if (!state.volume) return
  addAct({ kind: 'point', ras, rasVoxel, voxel: rasToVoxel(state.volume.affine_ras, ras), positive }, t0)
}

/** Run `step` after the lesion's earlier interactions (one at a time per lesion, in order, so
 * every answer's delta applies to the mask the previous one left). */
function enqueue (lesion, step) {
  lesion.running = true
  lesion.pending = (lesion.pending || 0) + 1
  setBusy(1)
  lesion.chain = (lesion.chain || Promise.resolve()).then(step).catch((err) => {
    lesion.status = 'error'
    say(err.message, 'error')
  }).finally(() => {
    setBusy(-1)
    if (--lesion.pending === 0) {
      lesion.running = false
      lesion.shown = lesion.generation
    }
    renderLesions()
    updateButtons()
  })
}

/** The request body of an interaction. */
function interactionBody (act) {
  if (act.kind === 'point') return { kind: 'point', xyz: round(act.ras, 3), positive: act.positive }
  if (act.kind === 'box') return { kind: 'box', corners: act.corners.map((c) => round(c, 3)) }
  return { kind: 'mask', edit: act.edit }
}

/** Send the lesion's interactions the server has not seen yet (a lesion's first interaction is
 * a positive point, a box or a mask: negative points clicked before it follow it). */
async function flush (lesion) {
  if (!state.lesions.includes(lesion)) return
  const sid = state.session.session_id
  if (lesion.serverN == null) lesion.serverN = (await api.addLesion(sid, lesion.label)).lesion
  for (;;) {
    const unsent = lesion.acts.filter((p) => !p.sent)
    if (!unsent.length || !state.lesions.includes(lesion)) return
    const p = lesion.acts.some((q) => q.sent) ? unsent[0] : unsent.find((q) => q.kind !== 'point' || q.positive)
    if (!p) return
    const started = lesion.t0
    lesion.status = 'segmenting'
    renderLesions()
    const tSend = performance.now()
    const answer = await api.interact(sid, lesion.serverN, interactionBody(p))
    const tAnswer = performance.now()
    p.sent = true
    if (p.backup) restoreEdit(lesion, p.backup) // the answer applies to the mask before the edit
    await showAnswer(lesion, answer)
    const tShown = performance.now()
    state.lastLatencyMs = tShown - started
    // where the time went, as the browser saw it (server stages: the answer's timings)
    state.lastBreakdown = {
      click_to_send_ms: tSend - started,
      round_trip_ms: tAnswer - tSend,
      server_worker_ms: (answer.timings.worker || 0) * 1000,
      overlay_ms: tShown - tAnswer
    }
    lesion.status = ''
    showAnswerInfo(answer, state.lastLatencyMs)
    say(`${lesion.label}: ${lesion.ml.toFixed(2)} mL (${lesion.voxels} voxels) in ${fmtS(state.lastLatencyMs / 1000)}`)
  }
}

function ensureOverlay (lesion) {
  if (lesion.overlay && nv.volumes.includes(lesion.overlay)) return false
  const img = nv.volumes[0].clone() // the image's own grid and header: the server's voxel order
  img.zeroImage()
  img.hdr.scl_slope = 1
  img.hdr.scl_inter = 0
  img.name = `mask-${lesion.n}`
  img.colormap = LESION_COLORMAPS[colourIndex(lesion)]
  img.opacity = OVERLAY_OPACITY
  img.cal_min = 0.5
  img.cal_max = 1
  lesion.overlay = img
  return true
}

/** Apply an answer (interaction, undo, reset): its delta to the lesion's overlay, its
 * measurements to the lesion's row. */
async function showAnswer (lesion, answer) {
  const added = ensureOverlay(lesion)
  const dims = nv.volumes[0].hdr.dims.slice(1, 4)
  await api.applyDelta(lesion.overlay.img, dims, answer)
  if (added) nv.addVolume(lesion.overlay)
  else nv.updateGLVolume() // same grid: the voxels changed in place
  lesion.voxels = answer.measurements.voxel_count
  lesion.ml = answer.measurements.volume_ml
  // the RECIST axes, once the worker measured the mask (drawn on the slice where they lie)
  lesion.measurements = answer.measurements.long_axis ? answer.measurements : null
  lesion.lastAnswer = answer
  redrawMarkers()
}

function showAnswerInfo (answer, latencyMs) {
  const t = answer.timings || {}
  $('job-status').textContent = `click answered (step ${answer.step})`
  $('job-progress').value = 1
  const rows = ['queue', 'load', 'encode', 'decode', 'prior', 'boundary', 'pipeline', 'worker']
    .filter((k) => t[k] !== null && t[k] !== undefined)
    .map((k) => `<tr><td>${esc(k)}</td><td>${esc(fmtS(Number(t[k])))}</td></tr>`)
  rows.push(`<tr class="latency"><td>click → overlay</td><td>${fmtS(latencyMs / 1000)}</td></tr>`)
  $('job-timings').innerHTML = rows.join('')
}

function undo () {
  const cur = currentLesion()
  if (cur && cur.pendingEdit) { // brush strokes not re-run yet: only the page has them
    if (cur.overlay) restoreEdit(cur, cur.pendingEdit.backup)
    cur.pendingEdit = null
    nv.updateGLVolume()
    renderLesions()
    updateButtons()
    say('brush strokes undone')
    return
  }
  const n = state.history.pop()
  const lesion = state.lesions.find((l) => l.n === n)
  if (!lesion) { updateButtons(); return }
  const p = lesion.acts.pop()
  state.active = state.lesions.indexOf(lesion)
  lesion.generation++
  if (!prompted(lesion) && lesion.acts.length) lesion.status = 'needs a positive point'
  // the server takes the interaction back once it has it (the chain runs after its answer)
  enqueue(lesion, async () => {
    if (!p.sent) {
      if (p.backup) { restoreEdit(lesion, p.backup); nv.updateGLVolume() } // an edit never sent
      return
    }
    const answer = await api.undoLesion(state.session.session_id, lesion.serverN)
    await showAnswer(lesion, answer)
    if (!lesion.acts.length) lesion.status = ''
    // the status shows the state after the undo, not the answer it took back
    $('job-status').textContent = `undone (step ${answer.step})`
    $('job-timings').innerHTML = ''
    say(`${lesion.label}: ${lesion.ml.toFixed(2)} mL (${lesion.voxels} voxels) after undo`)
  })
  redrawMarkers()
  renderLesions()
}

// ---------------------------------------------------------------------------------------------
// mask edits: the brush paints (or erases) the current lesion's overlay on the slice shown; the
// strokes stay in the page until "Re-run" sends the edited part as a mask interaction (the
// edited mask becomes the network's input), whose answer replaces them

let voxelOfRAS = null // RAS mm -> the server's voxel (i, j, k): the inverse of affine_ras

/** Paint `value` (1 paint, 0 erase) with the brush at the RAS-grid voxel `centre` of a 2D view
 * (`axCorSag`) into the lesion's overlay, keeping what it covered before in `pendingEdit`. */
function paintAt (lesion, centre, axCorSag, value) {
  const vol = nv.volumes[0]
  if (!value && !lesion.overlay) return // nothing to erase
  if (ensureOverlay(lesion)) nv.addVolume(lesion.overlay)
  const dims = vol.hdr.dims.slice(1, 4)
  const img = lesion.overlay.img
  const edit = lesion.pendingEdit || (lesion.pendingEdit = { backup: new Map(), lo: null, hi: null })
  for (const v of brushVoxels(vol, centre, state.brush, axCorSag)) {
    const ijk = apply(voxelOfRAS, gridToRAS(vol, v)).map(Math.round) // the overlay's (the server's) voxel
    if (ijk.some((x, n) => x < 0 || x >= dims[n])) continue
    const idx = ijk[0] + ijk[1] * dims[0] + ijk[2] * dims[0] * dims[1]
    if ((img[idx] > 0 ? 1 : 0) === value) continue
    if (!edit.backup.has(idx)) edit.backup.set(idx, img[idx])
    img[idx] = value
    edit.lo = edit.lo ? edit.lo.map((x, n) => Math.min(x, ijk[n])) : ijk.slice()
    edit.hi = edit.hi ? edit.hi.map((x, n) => Math.max(x, ijk[n] + 1)) : ijk.map((x) => x + 1)
  }
}

/** Put back the overlay's voxels an edit changed (`backup`: index -> value before). */
function restoreEdit (lesion, backup) {
  if (!lesion.overlay) return
  for (const [idx, value] of backup) lesion.overlay.img[idx] = value
}

let redrawQueued = false
function redrawSoon () {
  if (redrawQueued) return
  redrawQueued = true
  requestAnimationFrame(() => { redrawQueued = false; nv.updateGLVolume() })
}

/** Send the current lesion's brush strokes: the edited box of its mask as a mask interaction. */
async function rerun () {
  const lesion = currentLesion()
  const edit = lesion && lesion.pendingEdit
  if (!edit || lesion.running || lesion.encoding) return
  if (!lesion.overlay.img.some((v) => v > 0)) {
    say('the edited mask is empty: undo the strokes, or delete the lesion', 'error')
    return
  }
  lesion.encoding = true
  try {
    const dims = nv.volumes[0].hdr.dims.slice(1, 4)
    const encoded = await api.encodeBox(lesion.overlay.img, dims, edit.lo, edit.hi)
    lesion.pendingEdit = null
    addAct({ kind: 'mask', edit: encoded, backup: edit.backup }, performance.now())
  } finally {
    lesion.encoding = false
  }
}

function setTool (tool) {
  if (!TOOLS.includes(tool)) return
  state.tool = tool
  for (const t of TOOLS) $('tool-' + t).classList.toggle('active', t === tool)
  $('viewport').dataset.tool = tool
}

async function clearAll () {
  if (state.volume) {
    // the new session first: if it cannot be made, the lesions stay as they are (and saved as
    // they are) instead of vanishing from the page while the old session still holds them
    try {
      state.session = await api.createSession(state.volume.volume_id, 'RAS')
    } catch (err) {
      say(`could not clear: ${err.message}; the lesions are kept`, 'error')
      return
    }
  }
  resetLesions(true)
  updateButtons()
  say('cleared')
}

// ---------------------------------------------------------------------------------------------
// save: commit the session (the outputs are written now, and sent to PACS when asked), then
// download from the commit's job

async function commit (destinations = []) {
  await Promise.all(state.lesions.map((l) => l.chain))
  const accepted = await api.commitSession(state.session.session_id, destinations)
  const job = await api.waitJob(accepted.job_id, (j) => showJob(j))
  if (job.status !== 'succeeded') throw new Error(job.error ? job.error.message : `job ${job.status}`)
  state.lastCommit = job
  return job
}

async function download (format) {
  if (!state.lesions.some((l) => l.overlay && l.voxels)) return
  setBusy(1)
  say(`saving ${format}…`)
  try {
    const job = await commit()
    const buffer = await api.getResult(job.job_id, format)
    const ext = { nifti: 'nii.gz', 'dicom-seg': 'dcm', png: 'png' }[format]
    const type = { nifti: 'application/gzip', 'dicom-seg': 'application/dicom', png: 'image/png' }[format]
    const a = document.createElement('a')
    a.href = URL.createObjectURL(new Blob([buffer], { type }))
    a.download = `msam-${state.volume.volume_id.slice(0, 8)}-${format === 'dicom-seg' ? 'seg' : 'mask'}.${ext}`
    document.body.appendChild(a)
    a.click()
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove() }, 1000)
    say(`downloaded ${a.download}`)
  } catch (err) {
    say(`save failed: ${err.message}`, 'error')
  } finally {
    setBusy(-1)
  }
}

async function sendToPacs () {
  const names = (window.prompt('Send the DICOM-SEG to which PACS destinations? (configured node names, comma-separated)') || '')
    .split(',').map((s) => s.trim()).filter(Boolean)
  if (!names.length) {
    say('not sent: no destination named')
    return
  }
  setBusy(1)
  say('saving and sending…')
  try {
    const job = await commit(names)
    const done = Object.entries(job.destinations || {}).map(([k, v]) => `${k}: ${v}`).join(', ')
    say(`sent: ${done || 'queued'}`)
  } catch (err) {
    say(`send failed: ${err.message}`, 'error')
  } finally {
    setBusy(-1)
  }
}

// ---------------------------------------------------------------------------------------------
// mouse: a click (no drag) on a 2D view is a point; drags stay NiiVue's (crosshair, pan)

function canvasFrac (e) {
  const canvas = $('gl')
  const rect = canvas.getBoundingClientRect()
  const dpr = nv.uiData.dpr || window.devicePixelRatio || 1
  return nv.canvasPos2frac([(e.clientX - rect.left) * dpr, (e.clientY - rect.top) * dpr])
}

/** Whether a mouse event is over the 3D rendering (not a slice view, not beside the image). */
function onRenderView (e) {
  const rect = $('gl').getBoundingClientRect()
  const dpr = nv.uiData.dpr || window.devicePixelRatio || 1
  const tile = nv.tileIndex((e.clientX - rect.left) * dpr, (e.clientY - rect.top) * dpr)
  return tile >= 0 && !!nv.screenSlices[tile] && nv.screenSlices[tile].axCorSag > 2
}

function installMouse () {
  const canvas = $('gl')
  let down = null
  canvas.addEventListener('pointerdown', (e) => {
    down = { x: e.clientX, y: e.clientY, button: e.button, shift: e.shiftKey }
  })
  canvas.addEventListener('pointerup', (e) => {
    const d = down
    down = null
    if (!d || d.button !== e.button || !state.volume || state.tool !== 'click') return
    if (Math.hypot(e.clientX - d.x, e.clientY - d.y) > CLICK_SLOP_PX) return
    if (d.button !== 0 && d.button !== 2) return
    const hit = fracToRAS(nv.volumes[0], canvasFrac(e))
    if (!hit) { // the 3D view (NiiVue rotates it), or beside the image: say so there
      if (!onRenderView(e)) say('that click is beside the image: click inside it (on the lesion)', 'error')
      return
    }
    addPoint(hit.ras, hit.rasVoxel, d.button === 0 && !d.shift, performance.now())
  })
  canvas.addEventListener('contextmenu', (e) => e.preventDefault())
  // ctrl/cmd + wheel zooms the 2D views (plain wheel: slices, NiiVue's default)
  $('viewport').addEventListener('wheel', (e) => {
    if (!(e.ctrlKey || e.metaKey) || !state.volume) return
    e.preventDefault()
    e.stopPropagation()
    zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15)
  }, { capture: true, passive: false })
}

// the box and brush tools take the left button on the 2D views from NiiVue (its crosshair drag)
// while chosen: their mouse events stop at the viewport (capture), before they reach the canvas

function installTools () {
  const canvas = $('gl')
  const rubber = $('rubber')
  let drag = null
  const at = (e) => {
    const rect = canvas.getBoundingClientRect()
    const dpr = nv.uiData.dpr || window.devicePixelRatio || 1
    const pos = [(e.clientX - rect.left) * dpr, (e.clientY - rect.top) * dpr]
    const tile = nv.tileIndex(pos[0], pos[1])
    const axCorSag = tile >= 0 && nv.screenSlices[tile] ? nv.screenSlices[tile].axCorSag : -1
    return { tile, axCorSag, hit: axCorSag >= 0 && axCorSag <= 2 ? fracToRAS(nv.volumes[0], nv.canvasPos2frac(pos)) : null }
  }
  const showRubber = (e) => {
    const vp = $('viewport').getBoundingClientRect()
    const [x0, x1] = [Math.min(drag.x, e.clientX), Math.max(drag.x, e.clientX)]
    const [y0, y1] = [Math.min(drag.y, e.clientY), Math.max(drag.y, e.clientY)]
    Object.assign(rubber.style, { display: 'block', left: `${x0 - vp.left}px`, top: `${y0 - vp.top}px`, width: `${x1 - x0}px`, height: `${y1 - y0}px` })
  }
  const stroke = (to) => { // brush from the last voxel to `to`, every voxel between (fast drags)
    const from = drag.last || to
    const steps = Math.max(1, ...[0, 1, 2].map((n) => Math.abs(to[n] - from[n])))
    for (let s = drag.last ? 1 : 0; s <= steps; s++) {
      paintAt(drag.lesion, [0, 1, 2].map((n) => Math.round(from[n] + (to[n] - from[n]) * s / steps)), drag.axCorSag, drag.value)
    }
    drag.last = to
    redrawSoon()
  }
  $('viewport').addEventListener('mousedown', (e) => {
    if (state.tool === 'click' || e.button !== 0 || e.target !== canvas || !state.volume) return
    const a = at(e)
    if (!a.hit) return // the 3D view (NiiVue rotates it) or outside the image
    e.stopPropagation()
    e.preventDefault()
    const lesion = currentLesion()
    if (!lesion) return
    if (state.tool !== 'box' && (lesion.running || lesion.encoding)) {
      say(`${lesion.label} is being segmented: edit its mask once it is shown`, 'error')
      return
    }
    drag = { ...a, lesion, x: e.clientX, y: e.clientY, value: state.tool === 'paint' ? 1 : 0, last: null }
    if (state.tool === 'box') showRubber(e)
    else stroke(a.hit.rasVoxel)
  }, { capture: true })
  $('viewport').addEventListener('mousemove', (e) => {
    if (!drag) return
    e.stopPropagation()
    if (state.tool === 'box') { showRubber(e); return }
    const a = at(e)
    if (a.tile === drag.tile && a.hit) stroke(a.hit.rasVoxel)
  }, { capture: true })
  window.addEventListener('mouseup', (e) => {
    if (!drag || e.button !== 0) return
    e.stopPropagation()
    const d = drag
    drag = null
    rubber.style.display = 'none'
    if (state.tool !== 'box') {
      if (d.lesion.pendingEdit && d.lesion.pendingEdit.backup.size === 0) d.lesion.pendingEdit = null
      renderLesions()
      updateButtons()
      if (d.lesion.pendingEdit) say('brush strokes on ' + d.lesion.label + ': Re-run sends them (Undo takes them back)')
      return
    }
    const a = at(e)
    if (Math.hypot(e.clientX - d.x, e.clientY - d.y) <= CLICK_SLOP_PX) { say('drag a rectangle around the lesion'); return }
    if (a.tile !== d.tile || !a.hit) { say('drag the box within one view of the image', 'error'); return }
    const box = dragBox(nv.volumes[0], d.hit.rasVoxel, a.hit.rasVoxel, d.axCorSag)
    addAct({ kind: 'box', corners: box.corners, gridLo: box.lo, gridHi: box.hi, view: d.axCorSag, slice: d.hit.rasVoxel[viewAxes(d.axCorSag).through] }, performance.now())
  }, { capture: true })
}

function zoom (factor) {
  const p = nv.scene.pan2Dxyzmm
  nv.setPan2Dxyzmm([p[0], p[1], p[2], Math.min(20, Math.max(0.2, p[3] * factor))])
}

// ---------------------------------------------------------------------------------------------
// page

function setLayout (value) {
  if (value === 'multi') {
    nv.opts.multiplanarShowRender = SHOW_RENDER.ALWAYS
    nv.setSliceType(SLICE_TYPE.MULTIPLANAR)
  } else {
    nv.setSliceType(SLICE_TYPE[value.toUpperCase()])
  }
}

/** Radiological (the patient's left on the screen's right, the nose on the left in sagittal
 * views) or neurological (left on the left, the nose on the right). */
function setConvention (value) {
  const radiological = value !== 'neurological'
  nv.opts.sagittalNoseLeft = radiological
  nv.setRadiologicalConvention(radiological) // redraws
}

async function refreshReadiness () {
  let r
  try {
    r = await api.readiness()
  } catch (err) {
    r = { ready: false, reasons: [`the service does not answer (${err.message})`] }
  }
  const el = $('ready')
  el.textContent = r.ready ? `ready · ${r.workers} worker${r.workers === 1 ? '' : 's'}` : `not ready: ${(r.reasons || []).join('; ') || r.error?.message || ''}`
  el.className = r.ready ? 'ok' : 'warn'
}

function installControls () {
  $('file').addEventListener('change', (e) => { openFiles(e.target.files); e.target.value = '' })
  $('recent').addEventListener('change', (e) => { if (e.target.value) openRecent(e.target.value); e.target.value = '' })
  $('preset').innerHTML = Object.entries(PRESETS).map(([k, p]) => `<option value="${k}">${p.label}</option>`).join('')
  $('preset').addEventListener('change', (e) => applyPreset(e.target.value))
  $('layout').addEventListener('change', (e) => setLayout(e.target.value))
  $('convention').value = localStorage.getItem(CONVENTION_KEY) || 'radiological'
  setConvention($('convention').value)
  $('convention').addEventListener('change', (e) => {
    setConvention(e.target.value)
    try { localStorage.setItem(CONVENTION_KEY, e.target.value) } catch { /* full or disabled */ }
  })
  $('zoom-in').addEventListener('click', () => zoom(1.25))
  $('zoom-out').addEventListener('click', () => zoom(1 / 1.25))
  $('zoom-reset').addEventListener('click', () => nv.setPan2Dxyzmm([0, 0, 0, 1]))
  $('new-lesion').addEventListener('click', newLesion)
  $('undo').addEventListener('click', undo)
  $('clear').addEventListener('click', clearAll)
  $('rerun').addEventListener('click', rerun)
  for (const t of TOOLS) $('tool-' + t).addEventListener('click', () => setTool(t))
  $('brush').addEventListener('change', (e) => { state.brush = Math.max(0, Math.min(20, Math.round(Number(e.target.value) || 0))); e.target.value = state.brush })
  $('dl-nifti').addEventListener('click', () => download('nifti'))
  $('dl-seg').addEventListener('click', () => download('dicom-seg'))
  $('dl-png').addEventListener('click', () => download('png'))
  $('send-pacs').addEventListener('click', sendToPacs)
  const key = $('api-key')
  key.value = api.getApiKey() ? '••••••••' : ''
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault()
    if (key.value !== '••••••••') api.setApiKey(key.value.trim())
    key.value = api.getApiKey() ? '••••••••' : ''
    say(api.getApiKey() ? 'API key kept for this tab' : 'API key removed')
    refreshReadiness()
  })
  const vp = $('viewport')
  vp.addEventListener('dragover', (e) => { e.preventDefault(); vp.classList.add('dragging') })
  vp.addEventListener('dragleave', () => vp.classList.remove('dragging'))
  vp.addEventListener('drop', (e) => {
    e.preventDefault()
    vp.classList.remove('dragging')
    openFiles(e.dataTransfer.files)
  })
  document.addEventListener('keydown', (e) => {
    if (e.target.tagName === 'INPUT') return
    if ((e.ctrlKey || e.metaKey) && e.key === 'z') { e.preventDefault(); undo() }
    if (e.key === 'n' && !e.ctrlKey && !e.metaKey) newLesion()
  })
}

async function main () {
  installControls()
  renderRecent()
  updateButtons()
  await nv.attachToCanvas($('gl'))
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR)
  installMouse()
  installTools()
  refreshReadiness().catch(() => {})
  setInterval(() => refreshReadiness().catch(() => {}), 15000)
  say('open a volume: upload a NIfTI, NRRD, MetaImage (.mha, or .mhd with its data file) or DICOM (files or a zip), or pick a recent one')
}

// for the browser tests and the curious: the viewer's state, NiiVue and helpers
window.msamViewer = {
  nv,
  state,
  openRecent,
  showVolume,
  setTool,
  refreshReadiness,
  /** CSS pixel of a RAS point's voxel centre on the 2D view `sliceType` ('axial'...), or null. */
  canvasPointOf (ras, sliceType = 'axial') {
    const vol = nv.volumes[0]
    const hit = nv.frac2canvasPosWithTile(rasToFrac(vol, ras), SLICE_TYPE[sliceType.toUpperCase()])
    if (!hit) return null
    const dpr = nv.uiData.dpr || window.devicePixelRatio || 1
    return { x: hit.pos[0] / dpr, y: hit.pos[1] / dpr, tile: hit.tileIndex }
  },
  moveCrosshairTo (ras) {
    nv.scene.crosshairPos = rasToFrac(nv.volumes[0], ras)
    nv.updateGLVolume()
  }
}

main().catch((err) => say(`the viewer could not start: ${err.message}`, 'error'))
