"""RIS/PACS integration: where images come from and where results go, besides HTTP.

- :mod:`.settings`: the PACS block of the configuration (``MSAM_DICOMWEB_NODES``, AEs, listener,
  routing rules, webhooks), separate from :mod:`msam_service.settings`.
- :mod:`.nodes`: named, server-side configured DICOMweb nodes and DIMSE AEs. A request can only
  name them; it can never give a URL or a host (no server-side request forgery).
- :mod:`.dicomweb`: WADO-RS retrieve (pull) and STOW-RS store (push) through dicomweb-client.
- :mod:`.dimse_sender`: C-STORE SCU (pynetdicom) for results sent to configured AEs.
- :mod:`.dimse_listener`: ``msam dicom-listener``, a C-STORE SCP; a series is complete after an
  idle timeout, routing rules decide what becomes a volume (and optionally a job).
- :mod:`.received`: records of received series, so the API can reference them.
- :mod:`.webhooks`: allowlisted callback URLs, HMAC-SHA256 signatures, delivery with backoff.
- :mod:`.ingest`: a retrieved or received series -> a stored volume (:mod:`msam_service.volumes`).

Patient data: nothing here logs header text (names, IDs, descriptions); logs carry counts,
node names, AE titles and job ids only.
"""
