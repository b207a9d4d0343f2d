"""Stage 3, report: a result becomes what a person reads. The wording (decision, estimate,
inputs, reasons: worded once), the TID 1500 Structured Report (highdicom) and the result card
(a Secondary Capture image any viewer shows).

Hands on: SR and card datasets (files under reports/) for delivery.
May import: ``gateway.core``, ``gateway.store.wiring``, ``gateway.work`` (thumbnails, outcomes),
``osteogate.model``; never ``receive``, ``deliver`` or ``operate``.
"""
