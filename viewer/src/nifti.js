// The masks msam returns: gzipped NIfTI-1, uint8 labels, on the grid of the image shown.
// Read here directly (native gzip, no copy of the header logic), so a click updates the one
// label overlay in place instead of parsing a new image each time.

async function gunzip (buffer) {
  const stream = new Blob([buffer]).stream().pipeThrough(new DecompressionStream('gzip'))
  return new Response(stream).arrayBuffer()
}

/** `{dims: [nx, ny, nz], data: Uint8Array}` (voxels in file order) of a uint8 NIfTI-1 mask. */
export async function readMaskNifti (buffer) {
  let bytes = new Uint8Array(buffer)
  if (bytes[0] === 0x1f && bytes[1] === 0x8b) bytes = new Uint8Array(await gunzip(buffer))
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  let le = true
  if (dv.getInt32(0, true) !== 348) {
    if (dv.getInt32(0, false) !== 348) throw new Error('the mask is not a NIfTI-1 file')
    le = false
  }
  const dims = [1, 2, 3].map((n) => dv.getInt16(40 + 2 * n, le))
  const datatype = dv.getInt16(70, le)
  if (datatype !== 2) throw new Error(`unexpected mask data type ${datatype} (uint8 expected)`)
  const offset = Math.round(dv.getFloat32(108, le))
  const n = dims[0] * dims[1] * dims[2]
  if (offset + n > bytes.length) throw new Error('the mask file is truncated')
  return { dims, data: bytes.subarray(offset, offset + n) }
}
