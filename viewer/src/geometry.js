// Coordinates. The API takes points in "voxel" (array indices of the image as the server read
// it), "RAS" or "LPS" world millimetres. The viewer sends RAS mm of the centre of the voxel
// that was clicked:
//
//   canvas pixel --NiiVue canvasPos2frac--> texture fraction of the displayed (RAS-ordered) grid
//   --> voxel index in that grid (round(frac * dimsRAS - 0.5)) --> RAS mm through the image's
//   true affine (matRAS), never NiiVue's de-obliqued display matrix.
//
// The world is the same on both sides only if the browser and the server read the same affine,
// so on load the page compares NiiVue's header affine with the server's `affine_ras` and, when
// they differ (or the upload is not NIfTI), displays the server's own decoded image instead.

/** 4x4 row-major matrix (array of rows) times [x, y, z, 1]. */
export function apply (m, p) {
  return [0, 1, 2].map((r) => m[r][0] * p[0] + m[r][1] * p[1] + m[r][2] * p[2] + m[r][3])
}

/** Inverse of an affine 4x4 (rows); throws if singular. */
export function invertAffine (m) {
  const [a, b, c] = [m[0], m[1], m[2]]
  const det = a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0]) + a[2] * (b[0] * c[1] - b[1] * c[0])
  if (!Number.isFinite(det) || Math.abs(det) < 1e-12) throw new Error('singular affine')
  const inv = [
    [(b[1] * c[2] - b[2] * c[1]) / det, (a[2] * c[1] - a[1] * c[2]) / det, (a[1] * b[2] - a[2] * b[1]) / det],
    [(b[2] * c[0] - b[0] * c[2]) / det, (a[0] * c[2] - a[2] * c[0]) / det, (a[2] * b[0] - a[0] * b[2]) / det],
    [(b[0] * c[1] - b[1] * c[0]) / det, (a[1] * c[0] - a[0] * c[1]) / det, (a[0] * b[1] - a[1] * b[0]) / det]
  ]
  const t = [m[0][3], m[1][3], m[2][3]]
  return [
    [...inv[0], -(inv[0][0] * t[0] + inv[0][1] * t[1] + inv[0][2] * t[2])],
    [...inv[1], -(inv[1][0] * t[0] + inv[1][1] * t[1] + inv[1][2] * t[2])],
    [...inv[2], -(inv[2][0] * t[0] + inv[2][1] * t[1] + inv[2][2] * t[2])],
    [0, 0, 0, 1]
  ]
}

/** Same voxel -> mm mapping within `tolMm` at the corners of a grid of `shape`. */
export function affinesAgree (a, b, shape, tolMm = 1e-3) {
  if (!a || !b) return false
  for (const i of [0, shape[0] - 1]) {
    for (const j of [0, shape[1] - 1]) {
      for (const k of [0, shape[2] - 1]) {
        const pa = apply(a, [i, j, k])
        const pb = apply(b, [i, j, k])
        if (pa.some((v, n) => !(Math.abs(v - pb[n]) <= tolMm))) return false
      }
    }
  }
  return true
}

/** NiiVue's header affine of an NVImage as rows (voxel of the file's array -> mm). */
export function headerAffine (vol) {
  const m = vol && vol.hdr && vol.hdr.affine
  if (!m || m.length < 3) return null
  return [m[0].slice(0, 4), m[1].slice(0, 4), m[2].slice(0, 4), [0, 0, 0, 1]].map((r) => r.map(Number))
}

/** Texture fraction of the background image -> {ras: mm of the voxel centre, rasVoxel} or null. */
export function fracToRAS (vol, frac) {
  if (!vol || !frac || frac[0] < 0 || frac[1] < 0 || frac[2] < 0) return null
  const d = vol.dimsRAS // [ndim, nx, ny, nz] of the RAS-ordered grid
  const v = [0, 1, 2].map((n) => Math.min(d[n + 1] - 1, Math.max(0, Math.round(frac[n] * d[n + 1] - 0.5))))
  const m = vol.matRAS // gl-matrix, column-major storage of the row-major affine: m[r*4 + c]
  const ras = [0, 1, 2].map((r) => m[r * 4] * v[0] + m[r * 4 + 1] * v[1] + m[r * 4 + 2] * v[2] + m[r * 4 + 3])
  return { ras, rasVoxel: v }
}

/** RAS mm -> texture fraction of the background image (the inverse of fracToRAS for centres). */
export function rasToFrac (vol, ras) {
  const m = vol.matRAS
  const rows = [0, 1, 2].map((r) => [m[r * 4], m[r * 4 + 1], m[r * 4 + 2], m[r * 4 + 3]])
  const v = apply(invertAffine([...rows, [0, 0, 0, 1]]), ras)
  const d = vol.dimsRAS
  return [0, 1, 2].map((n) => (v[n] + 0.5) / d[n + 1])
}

/** Voxel indices (i, j, k) of the server's grid for a RAS point, given `affine_ras`. */
export function rasToVoxel (affineRas, ras) {
  return apply(invertAffine(affineRas), ras)
}

export function round (v, digits = 2) {
  const f = 10 ** digits
  return v.map((x) => Math.round(x * f) / f)
}

// -- 2D tools on a slice (box, brush). A 2D view shows a plane of NiiVue's RAS-ordered grid
// (`dimsRAS`): the axial view the plane of its axes 0 and 1, the coronal view 0 and 2, the
// sagittal view 1 and 2; the third axis is the one the view slices through.

/** {plane: [a, b], through: c}: the RAS-grid axes a 2D view (NiiVue's axCorSag 0, 1, 2) shows. */
export function viewAxes (axCorSag) {
  return [{ plane: [0, 1], through: 2 }, { plane: [0, 2], through: 1 }, { plane: [1, 2], through: 0 }][axCorSag] || null
}

/** RAS mm of a (possibly fractional) index of the RAS-ordered grid, through the true affine. */
export function gridToRAS (vol, v) {
  const m = vol.matRAS
  return [0, 1, 2].map((r) => m[r * 4] * v[0] + m[r * 4 + 1] * v[1] + m[r * 4 + 2] * v[2] + m[r * 4 + 3])
}

/** The 3D box of a rectangle dragged on a 2D view, from the RAS-grid voxels `v0` and `v1` of its
 * corners (on one slice). In the view's plane the box holds both corner voxels and every voxel
 * between them; through the slice it is centred on the slice and as deep, in mm, as the
 * rectangle's longer side (a lesion about as deep as it is wide), cut at the image's edges.
 * Answers `lo`, `hi` (inclusive RAS-grid indices) and `corners`: the two opposite corners, in RAS
 * mm, of the smallest world-aligned box holding those voxels whole (their outer edges, half a
 * voxel beyond the centres: the server keeps the voxels whose centre lies in the box). */
export function dragBox (vol, v0, v1, axCorSag) {
  const axes = viewAxes(axCorSag)
  if (!axes) return null
  const d = vol.dimsRAS
  const px = vol.pixDimsRAS || [1, 1, 1, 1]
  const lo = [0, 1, 2].map((n) => Math.min(v0[n], v1[n]))
  const hi = [0, 1, 2].map((n) => Math.max(v0[n], v1[n]))
  const sideMm = Math.max(...axes.plane.map((n) => (hi[n] - lo[n] + 1) * Math.abs(px[n + 1] || 1)))
  const c = axes.through
  const half = Math.floor(sideMm / 2 / Math.abs(px[c + 1] || 1))
  lo[c] = Math.max(0, v0[c] - half)
  hi[c] = Math.min(d[c + 1] - 1, v0[c] + half)
  const ras = []
  for (const x of [lo[0] - 0.5, hi[0] + 0.5]) {
    for (const y of [lo[1] - 0.5, hi[1] + 0.5]) {
      for (const z of [lo[2] - 0.5, hi[2] + 0.5]) ras.push(gridToRAS(vol, [x, y, z]))
    }
  }
  const corners = [[0, 1, 2].map((n) => Math.min(...ras.map((p) => p[n]))), [0, 1, 2].map((n) => Math.max(...ras.map((p) => p[n])))]
  return { lo, hi, corners }
}

/** The RAS-grid voxels a brush of `radius` voxels at `centre` covers on its slice (a disc in the
 * view's plane, one voxel thick), inside the grid. */
export function brushVoxels (vol, centre, radius, axCorSag) {
  const axes = viewAxes(axCorSag)
  if (!axes) return []
  const d = vol.dimsRAS
  const [a, b] = axes.plane
  const out = []
  for (let da = -radius; da <= radius; da++) {
    for (let db = -radius; db <= radius; db++) {
      if (da * da + db * db > radius * radius) continue
      const v = centre.slice()
      v[a] += da
      v[b] += db
      if (v.every((x, n) => x >= 0 && x < d[n + 1])) out.push(v)
    }
  }
  return out
}
