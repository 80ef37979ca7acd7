"""``msam hl7-listener``: HL7 v2 orders over MLLP become msam jobs.

Each connection is read in chunks until the MLLP end block, at most :data:`MAX_MESSAGE_BYTES`
within :data:`READ_DEADLINE_S` (a longer message gets ``AR``; one that does not arrive whole in
time, or is not framed, gets its connection closed), decoded in its MSH-18 character set
(:func:`msam_service.ris.hl7.decode`) and answered on the same connection; connections are
served on threads of their own.

For each ORM^O01 / OMI^O23 (:func:`msam_service.ris.hl7.parse_order`):

1. the sender (MSH-3, and MSH-4 when the endpoint names a facility) must be a configured RIS
   endpoint (``MSAM_RIS_ENDPOINTS``), else ``AR``; the endpoint gives the tenant, the PACS node,
   the destinations and where the ORU^R01 goes;
2. the order needs its accession number and an ``MSAM-PROMPTS`` note with at least one positive
   point, else ``AE``;
3. the study and series are found on the endpoint's node by QIDO-RS and the node's series
   rules (:mod:`msam_service.pacs.orders`); none or several is ``AE`` naming the candidates, and
   so is a node that has not answered within :data:`LOOKUP_DEADLINE_S` (a RIS waits 30 to 60 s
   for an acknowledgement before it sends the order again);
4. the job is created (retrieval on the I/O queue, then segmentation, then SEG to the
   destinations and ORU^R01 to the RIS) and the order is acknowledged ``AA`` with the job id.

An order sent again with the same message control id (MSH-10) by the same sender - a RIS that
did not get the first acknowledgement - gets the same job, not a second one. Logs carry job
ids, endpoint names and ACK codes only.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socketserver
import sys
import threading
from typing import Any, Callable

import redis

from msam_service import jobs, redis_conn
from msam_service.contract import JobRequest, JobSource
from msam_service.pacs import nodes, orders
from msam_service.pacs.ingest import VOLUME_OWNER_KEY
from msam_service.pacs.settings import PacsSettings, RisEndpoint, get_pacs_settings
from msam_service.ris import hl7
from msam_service.settings import Settings, get_settings
from msam_service.volumes import new_volume_id

logger = logging.getLogger("msam.hl7_listener")

#: Largest order taken (an order is a few kB; ``AR`` beyond).
MAX_MESSAGE_BYTES = 1 << 20
#: Seconds a connection has to deliver its whole message.
READ_DEADLINE_S = 30.0
#: Seconds the PACS has to answer an order's lookups before the order is acknowledged ``AE``.
LOOKUP_DEADLINE_S = 20.0


class Orders:
    """Order -> job, independent of the network (the MLLP handlers call :meth:`handle`)."""

    def __init__(self, settings: Settings, pacs: PacsSettings, r: redis.Redis, submit: Callable[[str], None]) -> None:
        self.settings, self.pacs, self.redis, self.submit = settings, pacs, r, submit

    def endpoint(self, order: hl7.Order) -> tuple[str, RisEndpoint]:
        for name, ep in self.pacs.ris_endpoints.items():
            if ep.application == order.sending_application and ep.facility in (None, order.sending_facility):
                return name, ep
        raise hl7.OrderError("the sending application (MSH-3/MSH-4) is not a configured RIS endpoint", "AR")

    def handle(self, text: str) -> bytes:
        """The MLLP-framed acknowledgement of one message."""
        try:
            order = hl7.parse_order(text)
            name, ep = self.endpoint(order)
            job_id = self.accept(order, name, ep)
            logger.info("order from RIS %s accepted: job %s", name, job_id)
            reply = hl7.ack(text, "AA", f"job {job_id}")
        except hl7.OrderError as exc:
            logger.info("order refused (%s)", exc.code)
            reply = hl7.ack(text, exc.code, str(exc))
        except nodes.PacsError as exc:
            logger.warning("order not processed: the PACS did not answer")
            reply = hl7.ack(text, "AE", f"{exc}; send the order again later")
        except Exception as exc:  # never leave the RIS without an answer
            logger.error("order failed: %s", type(exc).__name__)
            reply = hl7.ack(text, "AE", f"msam failed on this order ({type(exc).__name__})")
        return hl7.frame(reply)

    def handle_bytes(self, data: bytes) -> bytes:
        """:meth:`handle` of a message's bytes, in the character set its MSH-18 names."""
        try:
            text = hl7.decode(data)
        except hl7.OrderError as exc:
            logger.info("order refused (%s: character set)", exc.code)
            return hl7.frame(hl7.ack(data.decode("iso8859-1"), exc.code, str(exc)))
        return self.handle(text)

    def accept(self, order: hl7.Order, name: str, ep: RisEndpoint) -> str:
        seen = f"msam:hl7:order:{name}:{order.control_id}"
        earlier: Any = self.redis.get(seen)
        if earlier:
            return earlier.decode() if isinstance(earlier, bytes) else str(earlier)
        prompts = order.prompts
        if prompts is not None:
            from msam_service.prompts import to_points_boxes

            try:
                points, _ = to_points_boxes(prompts)
            except Exception as exc:
                raise hl7.OrderError(f"the {hl7.PROMPTS_NOTE} note is not a valid prompt document "
                                     f"({type(exc).__name__})") from exc
            if not points:
                raise hl7.OrderError(f"the {hl7.PROMPTS_NOTE} note needs at least one positive point")
        node = nodes.dicomweb_node(self.pacs, ep.pacs, ep.tenant)
        try:
            study_uid, series_uid = _within(LOOKUP_DEADLINE_S, f"the PACS {node.name}", lambda: orders.find_series(
                node, self.pacs.node_options(node.name).series, accession_number=order.accession_number,
                timeout=min(self.pacs.dicomweb_timeout_s, 30.0)))
        except orders.OrderProblem as exc:
            listed = "; ".join(f"{c.get('series_uid') or c.get('study_uid')} {c.get('description', '')}".strip()
                               for c in exc.candidates[:5])
            raise hl7.OrderError(f"{exc}{': ' + listed if listed else ''}") from exc
        job_id, volume_id = jobs.new_id(), new_volume_id()
        ttl = self.settings.job_ttl_s
        # without a prompts note, the lesions are the radiologist's line measurements stored with
        # the study (SR / GSPS), found by the I/O worker once the series is retrieved
        request = JobRequest(
            prompts=prompts, lines_from_pacs=prompts is None, ris=name,  # type: ignore[arg-type]
            order=order.to_record(), destinations=list(ep.destinations),
            source=JobSource(pacs=node.name, study_uid=study_uid, series_uid=series_uid,
                             accession_number=order.accession_number, selected_by="series rules"),
            base_url=self.settings.public_url.rstrip("/") or None)
        if not self.redis.set(seen, job_id, nx=True, ex=ttl):  # the same order, concurrently
            return self.accept(order, name, ep)
        self.redis.set(VOLUME_OWNER_KEY.format(volume_id), ep.tenant, ex=ttl)
        jobs.JobStore(self.redis, ttl).create(job_id, tenant=ep.tenant, volume_id=volume_id, request=request)
        self.submit(job_id)
        return job_id


def _within(seconds: float, who: str, call: Callable[[], Any]) -> Any:
    """``call()``, run on a thread of its own so that the order is answered after ``seconds``
    even when ``who`` has not answered (the call then ends by its own timeouts, in the
    background); :class:`~msam_service.pacs.nodes.PacsError` then."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="msam-hl7-lookup", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise nodes.PacsError(f"{who} did not answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class _Connection(socketserver.BaseRequestHandler):
    """One MLLP connection: a message in, its acknowledgement out, then the next message."""

    server: "MllpServer"

    def handle(self) -> None:
        while True:
            try:
                data = hl7.read_frame(self.request, MAX_MESSAGE_BYTES, READ_DEADLINE_S)
            except hl7.FrameError as exc:
                if exc.data.startswith(hl7.START) and len(exc.data) > MAX_MESSAGE_BYTES:
                    header = exc.data[1:4096].decode("iso8859-1")
                    self.request.sendall(hl7.frame(hl7.ack(header, "AR", str(exc))))
                return  # closed, not framed, or too slow: the connection ends
            except OSError:
                return
            self.request.sendall(self.server.orders.handle_bytes(data))


class MllpServer(socketserver.ThreadingTCPServer):
    """MLLP over TCP for :class:`Orders`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, orders: Orders, host: str, port: int) -> None:
        self.orders = orders
        super().__init__((host, port), _Connection)


def make_server(service: Orders, host: str, port: int) -> MllpServer:
    return MllpServer(service, host, port)


def run(host: str | None = None, port: int | None = None) -> int:
    from msam_service.queue import enqueue_retrieval, make_celery

    settings = get_settings()
    pacs = get_pacs_settings()
    if not settings.redis_url:
        print("msam hl7-listener: error: MSAM_REDIS_URL / REDIS_URL is not set", file=sys.stderr)
        return 1
    if not pacs.ris_endpoints:
        print("msam hl7-listener: error: no RIS endpoint is configured (MSAM_RIS_ENDPOINTS)", file=sys.stderr)
        return 1
    queue_app = make_celery(settings, "msam-hl7-listener")
    service = Orders(settings, pacs, redis_conn.client(settings.redis_url),
                     submit=lambda job_id: enqueue_retrieval(queue_app, job_id))
    host = host or pacs.hl7_listener_host
    port = pacs.hl7_listener_port if port is None else port
    server = make_server(service, host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"msam hl7-listener: MLLP on {host}:{server.server_address[1]}, {len(pacs.ris_endpoints)} RIS "
          "endpoint(s)", file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hl7-listener", help="take HL7 v2 orders (ORM^O01, OMI^O23) over MLLP",
                       description="Take HL7 v2 orders (ORM^O01, OMI^O23) over MLLP and queue msam jobs; "
                       "results go back as ORU^R01.")
    p.add_argument("--host", default=None, help="address to listen on (default: $MSAM_HL7_LISTENER_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default: $MSAM_HL7_LISTENER_PORT)")
    p.set_defaults(func=lambda args: _main(args.host, args.port))


def _main(host: str | None, port: int | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(host, port)
    except (ValueError, OSError) as exc:
        print(f"msam hl7-listener: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="msam-hl7-listener")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    a = parser.parse_args()
    sys.exit(_main(a.host, a.port))
