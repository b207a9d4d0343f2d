"""Ground truth from the site: DXA results in (HL7 v2 ORU over MLLP, CSV), matched to the
screened studies of the same patient, the site's own validation of the gateway and the gate
that opens or closes on that evidence.

Owns: ``hl7`` (ORU^R01 -> DXA results, ACKs), ``mllp`` (the listener ``serve`` runs),
``csvimport`` (``osteogate dxa import``), ``exams`` (saving an exam once per patient and day),
``matching`` (``load_pairs``: DXA exams paired with screened studies), ``stats`` (numpy AUC,
patient bootstrap, calibration, Bland-Altman), ``validation`` (``osteogate validate``'s figures
beside the model card's claims), ``validation_report`` (report.html with matplotlib figures,
imported lazily), ``gate`` (the site gate: ``decide``, ``SiteGate``, withholding a result,
releasing held deliveries). The commands are in ``gateway.operate.cli`` (dxa, validate).
The tables are ``gateway.store.dxa``.

May import: ``gateway.core``, ``gateway.store``, ``osteogate.model``.
"""
