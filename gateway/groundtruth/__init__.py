"""Ground truth from the site: DXA results in (HL7 v2 ORU over MLLP, CSV), matched to the
screened studies of the same patient, the site's own validation of the gateway and the gate
that opens or closes on that evidence.

May import: ``gateway.core``, ``gateway.store.wiring``, ``osteogate.model``.
"""
