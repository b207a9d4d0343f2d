"""Stage 4, deliver: report objects go back to the PACS. The delivery queue (one lane per
destination, exponential backoff that survives restarts, a result's objects sent together),
the C-STORE SCU and the DICOMweb STOW-RS sender.

Hands on: delivery outcomes (deliveries rows).
May import: ``gateway.core``, ``gateway.store.wiring``; never ``work`` or ``report`` (it sends files).
"""
