"""Results for a RIS: what a finished job says per lesion, as FHIR R4 resources
(:mod:`.fhir`) and as HL7 v2 messages (:mod:`.hl7`, :mod:`.hl7_listener` for orders over MLLP).

- :mod:`.measurements`: a job's lesions with their measurements (volume from the mask's voxel
  count and the image's voxel size; long and short axis when the job reports them).
- :mod:`.fhir`: DiagnosticReport + one Observation per lesion (fhir.resources models: each
  resource is validated as it is built).
- :mod:`.hl7`: ORM^O01 / OMI^O23 orders in, ACK out, ORU^R01 results out (hl7apy), MLLP framing.
- :mod:`.hl7_listener`: ``msam hl7-listener``.

Nothing here logs message content: orders carry patient names and identifiers.
"""
