// The msam HTTP API as the page uses it. Every call carries the API key (if one was entered):
// `Authorization: Bearer <key>`; the key lives in sessionStorage only (gone with the tab).
// Nothing here logs request bodies, file names or headers: no patient data reaches the console.

const KEY_STORAGE = 'msam.apiKey'

export function getApiKey () {
  try { return sessionStorage.getItem(KEY_STORAGE) || '' } catch { return '' }
}

export function setApiKey (key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key)
    else sessionStorage.removeItem(KEY_STORAGE)
  } catch { /* storage disabled: the key lasts until reload */ }
}

export class ApiError extends Error {
  constructor (status, code, message) {
    super(message)
    this.status = status
    this.code = code
  }
}

function url (path) {
  // relative to the page, so the viewer also works behind a path prefix
  return new URL(path.replace(/^\//, ''), document.baseURI).toString()
}

function headers (extra = {}) {
  const key = getApiKey()
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra }
}

async function errorOf (response) {
  let code = 'http_' + response.status
  let message = response.statusText || 'request failed'
  try {
    const body = await response.json()
    if (body && body.error) {
      code = body.error.code || code
      message = body.error.message || message
    } else if (body && body.detail) {
      message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail)
    }
  } catch { /* not JSON */ }
  if (response.status === 401) message += ' - enter an API key (top right)'
  return new ApiError(response.status, code, message)
}

async function call (path, { method = 'GET', json, signal } = {}) {
  const init = { method, headers: headers(json !== undefined ? { 'Content-Type': 'application/json' } : {}), signal }
  if (json !== undefined) init.body = JSON.stringify(json)
  const response = await fetch(url(path), init)
  if (!response.ok) throw await errorOf(response)
  return response
}

/** POST /volumes (multipart, field `image`), with upload progress (0..1) through `onProgress`. */
export async function uploadVolume (files, onProgress = () => {}) {
  const names = await uploadNames(files)
  return new Promise((resolve, reject) => {
    const form = new FormData()
    files.forEach((f, n) => form.append('image', f, names[n]))
    const xhr = new XMLHttpRequest()
    xhr.open('POST', url('volumes'))
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v)
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total) }
    xhr.onerror = () => reject(new ApiError(0, 'network', 'the upload failed (network error)'))
    xhr.onload = async () => {
      const response = new Response(xhr.responseText, { status: xhr.status, statusText: xhr.statusText })
      if (xhr.status >= 200 && xhr.status < 300) resolve(await response.json())
      else reject(await errorOf(response))
    }
    xhr.send(form)
  })
}

// The server only looks at the suffix of a file name; never send the name itself (it may
// carry a patient's name).
export function safeName (name) {
  const lower = (name || '').toLowerCase()
  for (const suffix of ['.nii.gz', '.nii', '.nrrd', '.mha', '.mhd', '.zip', '.dcm']) {
    if (lower.endsWith(suffix)) return 'image' + suffix
  }
  return 'image'
}

/** The names to send for `files`: `safeName`s, except the data file of a MetaImage pair (a .mhd
 * and one other file), sent under the plain name its header gives it (the header, uploaded too,
 * holds that name already; the server pairs the two by it). */
export async function uploadNames (files) {
  const names = files.map((f) => safeName(f.name))
  const header = files.findIndex((f) => /\.mhd$/i.test(f.name))
  if (header >= 0 && files.length === 2) {
    const text = await files[header].slice(0, 1 << 16).text()
    const m = text.match(/^\s*ElementDataFile\s*=\s*(\S+)\s*$/mi)
    if (m && !/[\\/]/.test(m[1]) && m[1].toUpperCase() !== 'LOCAL') names[1 - header] = m[1]
  }
  return names
}

export async function segment (volumeId, prompts) {
  return (await call('segment', { method: 'POST', json: { volume_id: volumeId, prompts } })).json()
}

export async function getJob (jobId, signal) {
  return (await call(`jobs/${jobId}`, { signal })).json()
}

export async function cancelJob (jobId) {
  try { await call(`jobs/${jobId}`, { method: 'DELETE' }) } catch { /* already gone */ }
}

export async function getResult (jobId, format) {
  return (await call(`jobs/${jobId}/result?format=${encodeURIComponent(format)}`)).arrayBuffer()
}

// -- interactive sessions: every click is an interaction whose answer holds the lesion's mask
// delta (no polling); undo is the server's; outputs are written on commit.

export async function createSession (volumeId, space = 'RAS') {
  return (await call('sessions', { method: 'POST', json: { volume_id: volumeId, space } })).json()
}

export async function addLesion (sessionId, label) {
  return (await call(`sessions/${sessionId}/lesions`, { method: 'POST', json: label ? { label } : {} })).json()
}

/** POST an interaction; answers once the worker has (asking again while the answer is 202). */
export async function interact (sessionId, lesion, interaction) {
  let response = await call(`sessions/${sessionId}/lesions/${lesion}/interactions`, { method: 'POST', json: interaction })
  let body = await response.json()
  while (response.status === 202) {
    response = await call(`sessions/${sessionId}/interactions/${body.interaction_id}?wait=5`)
    body = await response.json()
  }
  return body
}

export async function undoLesion (sessionId, lesion) {
  return (await call(`sessions/${sessionId}/lesions/${lesion}/undo`, { method: 'POST' })).json()
}

export async function resetLesion (sessionId, lesion) {
  return (await call(`sessions/${sessionId}/lesions/${lesion}/reset`, { method: 'POST' })).json()
}

export async function commitSession (sessionId, destinations = []) {
  return (await call(`sessions/${sessionId}/commit`, { method: 'POST', json: { destinations } })).json()
}

/** Apply an answer's mask delta to `img` (the overlay's voxels, NIfTI file order: i fastest,
 * dims `dims` = [ni, nj, nk]). The delta's box is in C order (i slowest, k fastest), one bit a
 * voxel, least significant bit first, zlib, base64. `base` null: the delta is over an empty mask. */
export async function applyDelta (img, dims, answer) {
  if (answer.base == null) img.fill(0)
  const d = answer.delta
  if (!d) return
  const raw = Uint8Array.from(atob(d.data), (c) => c.charCodeAt(0))
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream('deflate'))
  const bits = new Uint8Array(await new Response(stream).arrayBuffer())
  const [si, sj, sk] = [d.hi[0] - d.lo[0], d.hi[1] - d.lo[1], d.hi[2] - d.lo[2]]
  const [ni, nj] = dims
  let n = 0
  for (let i = 0; i < si; i++) {
    for (let j = 0; j < sj; j++) {
      const row = (d.lo[0] + i) + (d.lo[1] + j) * ni
      for (let k = 0; k < sk; k++, n++) {
        img[row + (d.lo[2] + k) * ni * nj] = (bits[n >> 3] >> (n & 7)) & 1
      }
    }
  }
}

/** The box `lo <= (i, j, k) < hi` of `img` (a mask's voxels, NIfTI file order: i fastest, dims
 * `dims` = [ni, nj, nk]) in the delta format: C order (i slowest, k fastest), one bit a voxel
 * (non-zero: in the mask), least significant bit first, zlib (RFC 1950), base64. */
export async function encodeBox (img, dims, lo, hi) {
  const [si, sj, sk] = [hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]]
  const [ni, nj] = dims
  const bits = new Uint8Array(Math.ceil((si * sj * sk) / 8))
  let n = 0
  for (let i = 0; i < si; i++) {
    for (let j = 0; j < sj; j++) {
      const row = (lo[0] + i) + (lo[1] + j) * ni
      for (let k = 0; k < sk; k++, n++) {
        if (img[row + (lo[2] + k) * ni * nj] > 0) bits[n >> 3] |= 1 << (n & 7)
      }
    }
  }
  const stream = new Blob([bits]).stream().pipeThrough(new CompressionStream('deflate'))
  const packed = new Uint8Array(await new Response(stream).arrayBuffer())
  let text = ''
  for (let i = 0; i < packed.length; i += 0x8000) text += String.fromCharCode(...packed.subarray(i, i + 0x8000))
  return { lo: lo.slice(), hi: hi.slice(), encoding: 'zlib-packbits-le-c', data: btoa(text) }
}

export async function getVolumeImage (volumeId) {
  return (await call(`viewer/volumes/${volumeId}/image`)).arrayBuffer()
}

export async function readiness () {
  const response = await fetch(url('readyz'), { headers: headers() })
  try { return await response.json() } catch { return { ready: false, reasons: ['no answer'] } }
}

/** Poll a job until it ends; `onUpdate(job)` after every poll. Fast at first (warm clicks end
 * in a few hundred ms), slower for long jobs. */
export async function waitJob (jobId, onUpdate = () => {}, { signal } = {}) {
  const started = performance.now()
  for (;;) {
    const job = await getJob(jobId, signal)
    onUpdate(job)
    if (['succeeded', 'failed', 'canceled'].includes(job.status)) return job
    const elapsed = performance.now() - started
    await sleep(elapsed < 3000 ? 50 : elapsed < 15000 ? 200 : 1000, signal)
  }
}

function sleep (ms, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms)
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); reject(new DOMException('aborted', 'AbortError')) }, { once: true })
  })
}
