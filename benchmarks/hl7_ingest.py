"""HL7 DXA results in: ORU^R01 messages/s stored and acknowledged by the MLLP listener.

One connection sends ``--n`` messages (3 T-score OBX each, new patients) and waits for each ACK,
as an interface engine does; the reference is the same store (SQLite, synchronous=FULL) written
by ``exams.save_results`` directly, one transaction per message, so the ratio is the price of
MLLP framing, parsing and the ACK. Also: the time to refuse a 10 MB message (read to its end and
dropped) and the listener's answer right after it.

    .venv/bin/python benchmarks/hl7_ingest.py [--n 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from osteogate.gateway.core.groundtruth_config import DEFAULT_LOINC_CODES, GroundTruthConfig  # noqa: E402
from osteogate.gateway.groundtruth.exams import save_results  # noqa: E402
from osteogate.gateway.groundtruth.hl7 import dxa_results, parse_message  # noqa: E402
from osteogate.gateway.groundtruth.mllp import MllpListener  # noqa: E402
from osteogate.gateway.store.db import Database  # noqa: E402

from tests.helpers.mllp_client import MllpClient, oru_message  # noqa: E402

SITES = [("38267-1", "DXA Lumbar spine [T-score]", "-2.1"), ("38264-8", "DXA Hip [T-score]", "-1.4"),
         ("38263-0", "DXA Femur [T-score]", "-1.8")]


def messages(n: int, prefix: str) -> list[str]:
    return [oru_message(f"{prefix}{i:06d}", "20250601", SITES, control_id=f"{prefix}{i}") for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="messages per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'b.db'}")
        db.migrate()
        started = time.perf_counter()
        for text in messages(args.n, "REF"):
            with db.session(write=True) as session:
                save_results(session, dxa_results(parse_message(text), DEFAULT_LOINC_CODES))
        reference = args.n / (time.perf_counter() - started)

        listener = MllpListener(GroundTruthConfig(bind="127.0.0.1"), db, port=0)
        listener.start()
        try:
            with MllpClient(listener.port, timeout=60) as client:
                batch = messages(args.n, "MLLP")
                started = time.perf_counter()
                codes = {client.send(text).code for text in batch}
                rate = args.n / (time.perf_counter() - started)
                huge = messages(1, "BIG")[0].replace("TEST^PATIENT", "X" * (10 * 2**20))
                started = time.perf_counter()
                refused = client.send(huge)
                refuse_s = time.perf_counter() - started
                after = client.send(messages(1, "AFTER")[0]).code
        finally:
            listener.stop()
            db.dispose()
    print(f"direct save_results (reference): {reference:.0f} messages/s")
    print(f"MLLP listener, one connection:   {rate:.0f} messages/s ({rate / reference:.2f}x), ACKs {sorted(codes)}")
    print(f"10 MB message: {refused.code} in {refuse_s:.2f} s; next message on the same connection: {after}")
    return 0 if codes == {"AA"} and refused.code == "AR" and after == "AA" else 1


if __name__ == "__main__":
    sys.exit(main())
