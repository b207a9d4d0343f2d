"""Stage 2, work: a job becomes a result. The classifier worker claims jobs, decodes the
pixels (decoder processes for slow codecs, decode-ahead), decides the region, reads the
covariates and asks the model for a StudyAssessment, then persists it with the report objects
made by the publisher it was given (the report stage, wired in by ``operate``).

Hands on: a study result (study_results/image_results rows) and its objects for delivery.
May import: ``gateway.core``, ``gateway.store.wiring``, ``gateway.groundtruth`` (site gate),
``osteogate.model``; never ``report``, ``deliver`` or ``operate``.
"""
