// `npm run build` (make viewer): bundle src/ into ../api/static/viewer/ (committed, served by
// the API at / and /static, so running the service needs no Node.js).
import { build } from 'esbuild'
import { createHash } from 'node:crypto'
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'

const out = new URL('../api/static/viewer/', import.meta.url).pathname
rmSync(out, { recursive: true, force: true })
mkdirSync(out, { recursive: true })
// NiiVue reaches OME-Zarr's compression codecs (numcodecs, 1.4 MB of WebAssembly) through
// dynamic imports; the viewer never opens Zarr, so they are left out of the bundle.
const noZarrCodecs = {
  name: 'no-zarr-codecs',
  setup (b) {
    b.onResolve({ filter: /^numcodecs(\/.*)?$/ }, (args) => ({ path: args.path, namespace: 'stub' }))
    b.onLoad({ filter: /.*/, namespace: 'stub' }, () => ({
      contents: 'throw new Error("Zarr codecs are not part of the msam viewer")', loader: 'js'
    }))
  }
}

await build({
  entryPoints: ['src/main.js'],
  plugins: [noZarrCodecs],
  bundle: true,
  minify: true,
  format: 'iife',
  target: ['chrome110', 'firefox115', 'safari16'],
  outfile: out + 'viewer.js',
  legalComments: 'linked',
  logLevel: 'warning',
  metafile: false
})
await build({ entryPoints: ['src/style.css'], bundle: true, minify: true, outfile: out + 'viewer.css', logLevel: 'warning' })
copyFileSync('index.html', out + 'index.html')

// what the bundle was built from: tests/viewer checks it against viewer/ (no Node needed), so a
// source edit without `make viewer` fails the tests instead of shipping a stale bundle
const sources = ['build.mjs', 'index.html', 'package.json', 'package-lock.json',
  ...readdirSync('src').sort().map((f) => 'src/' + f)]
const hash = createHash('sha256')
for (const f of sources) hash.update(f + '\0').update(readFileSync(f)).update('\0')
writeFileSync(out + 'SOURCE_SHA256', hash.digest('hex') + '\n')
