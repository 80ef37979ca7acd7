"""``msam-remote``: the service from the command line, through :mod:`msam_client`.

    msam-remote upload IMAGE...
    msam-remote click VOLUME_ID --positive I,J,K [--positive ...] [--negative I,J,K ...] [--out mask.nii.gz]
    msam-remote segment VOLUME_ID --positive I,J,K [--negative ...] [--format nifti] --out FILE
    msam-remote job JOB_ID

``click`` runs an interactive session (one lesion, one interaction per click, printing each
answer's volume and timings), commits it, deletes the session and downloads the committed
result; ``segment`` does
the same clicks as one job. The service is ``--url`` or ``MSAM_URL`` (default
http://127.0.0.1:8000); the key ``MSAM_API_KEY``. Exit status: 0 done, 1 the service refused or
failed (its message on stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from msam_client.client import Client
from msam_client.errors import JobFailed, MsamError, Unreachable

#: what ``GET /jobs/{id}/result?format=`` gives (which of them a job has depends on its input)
FORMATS = ("dicom-seg", "rtstruct", "nifti", "png", "mha", "sr", "fhir")


def _xyz(text: str) -> list[float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give a point as I,J,K (three numbers, comma-separated)")
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not three numbers") from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msam-remote", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("MSAM_URL", "http://127.0.0.1:8000"))
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="upload an image; prints its volume record")
    up.add_argument("image", nargs="+")
    for name, text in (("click", "an interactive session: one interaction per click, then commit"),
                       ("segment", "one job with all the clicks")):
        c = sub.add_parser(name, help=text)
        c.add_argument("volume_id")
        c.add_argument("--positive", type=_xyz, action="append", default=[], metavar="I,J,K")
        c.add_argument("--negative", type=_xyz, action="append", default=[], metavar="I,J,K")
        c.add_argument("--space", default="voxel", choices=["voxel", "LPS", "RAS"])
        c.add_argument("--format", default=None, choices=FORMATS, help="result to download (default: the service's)")
        c.add_argument("--out", default=None, help="where to write the result")
    j = sub.add_parser("job", help="a job's record")
    j.add_argument("job_id")
    return p


def run(args: argparse.Namespace) -> int:
    with Client(args.url, os.environ.get("MSAM_API_KEY")) as client:
        if args.command == "upload":
            vol = client.upload(*args.image)
            print(json.dumps({"volume_id": vol.volume_id, "shape": list(vol.shape), "format": vol.format}))
            return 0
        if args.command == "job":
            print(json.dumps(client.job(args.job_id).body, indent=1))
            return 0
        if not args.positive:
            print("msam-remote: error: give at least one --positive click", file=sys.stderr)
            return 2
        if args.out and not Path(args.out).resolve().parent.is_dir():
            print(f"msam-remote: error: --out {args.out}: its folder does not exist", file=sys.stderr)
            return 2
        if args.command == "segment":
            lesion = {"positive": args.positive, **({"negative": args.negative} if args.negative else {})}
            job = client.submit(args.volume_id, [lesion], space=args.space).wait()
        else:
            session = client.session(args.volume_id, space=args.space)
            try:
                n = session.add_lesion()
                for xyz, positive in [(x, True) for x in args.positive] + [(x, False) for x in args.negative]:
                    answer = session.click(n, xyz, positive=positive)
                    print(json.dumps({"step": answer.step, "measurements": answer.measurements,
                                      "worker_s": answer.timings.get("worker")}))
                committed = session.commit()  # the commit's job keeps the masks it took
            finally:
                _forget(session)
            job = committed.wait()
        print(json.dumps({"job_id": job.job_id, "results": sorted(job.body.get("results", {}))}))
        if args.out:
            client.download(job.job_id, args.format, args.out)
        return 0


def _forget(session) -> None:  # noqa: ANN001
    """Delete the session ``click`` opened (it expires on its own where the service does not answer)."""
    try:
        session.delete()
    except (MsamError, Unreachable):
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (MsamError, JobFailed, Unreachable, TimeoutError) as exc:
        print(f"msam-remote: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"msam-remote: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
