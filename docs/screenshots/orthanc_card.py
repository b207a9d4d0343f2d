#!/usr/bin/env python3
"""Screenshots of what Orthanc shows for OsteoGate's results, taken by headless Chromium.

Starts an Orthanc configured by the deploy/orthanc recipe (the same way tests/test_orthanc_recipe.py
does: free ports, private folders, StableAge 2 s) and `osteogate serve` pointing back at it,
uploads a sample study into Orthanc, waits until OsteoGate's objects are in that study, and
saves, for each of them:

* ``orthanc_<kind>_explorer.png``: Orthanc Explorer's instance page
  (``/app/explorer.html#instance?uuid=...``);
* ``orthanc_<kind>_preview.png``: Orthanc's rendering of an image object
  (``/instances/{id}/preview``; for the result card, not for the SR, which has no pixels);

plus ``orthanc_study_explorer.png``, the study page with every series. <kind> is ``sr`` or
``card`` (a Secondary Capture from OsteoGate). Run from the repository root:

    .venv/bin/python docs/screenshots/orthanc_card.py --out /tmp/shots            # SR only
    .venv/bin/python docs/screenshots/orthanc_card.py --out /tmp/shots --card     # wait for the card too
    .venv/bin/python docs/screenshots/orthanc_card.py --dicomweb ...              # results by STOW-RS

Needs Debian's orthanc, orthanc-dicomweb and chromium. Everything listens on 127.0.0.1 only and
is stopped at the end; Chromium runs with a fresh profile and no background networking.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from osteogate.gateway.operate.preflight import SHIPPED_MODEL  # noqa: E402

from tests.gateway_harness import GatewayProcess  # noqa: E402
from tests.helpers import free_port, recipe_orthanc, sample_file, wait_until  # noqa: E402
from tests.helpers.orthanc import OrthancServer  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1",
]
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
OWN_MANUFACTURER = "OsteoGate"
DEFAULT_STUDY = ["knee_dx.dcm", "knee_dx_2.dcm"]


def kind_of(tags: dict[str, Any]) -> str | None:
    """"sr" or "card" for OsteoGate's objects, None for anything else."""
    if tags.get("Manufacturer") != OWN_MANUFACTURER:
        return None
    sop_class = str(tags.get("SOPClassUID", ""))
    if sop_class == COMPREHENSIVE_3D_SR:
        return "sr"
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return "card"
    return "other"


def returned(orthanc: OrthancServer, study_uid: str) -> dict[str, str]:
    """kind -> Orthanc instance ID of OsteoGate's objects in the study (latest of each kind)."""
    found: dict[str, str] = {}
    for instance in orthanc.study_instances(study_uid):
        kind = kind_of(orthanc.instance_tags(instance["ID"]))
        if kind:
            found[kind] = instance["ID"]
    return found


def screenshot(url: str, out: Path, size: str, profile_root: Path, budget_ms: int = 8000) -> None:
    """One page, one PNG: Chromium in a fresh profile, given time for the page's own requests."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=profile_root))
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed for {url}: {result.stderr[-2000:]}")
    print(f"  {out}  <-  {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("screenshots"), help="folder for the PNG files")
    parser.add_argument("--card", action="store_true", help="also wait for the result card (Secondary Capture)")
    parser.add_argument("--dicomweb", action="store_true", help="results back by STOW-RS instead of C-STORE")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="checkpoint (default: the shipped one)")
    parser.add_argument("--files", nargs="+", default=DEFAULT_STUDY, metavar="NAME",
                        help=f"sample_dicom files forming the study (default: {' '.join(DEFAULT_STUDY)})")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the results")
    parser.add_argument("--size", default="1280,1400", help="browser window WIDTH,HEIGHT")
    args = parser.parse_args(argv)

    if not Path(CHROMIUM).is_file():
        print(f"{CHROMIUM} not found (Debian package chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="osteogate-shots-"))
    files = [sample_file(name) for name in args.files]
    gateway_port = free_port()
    orthanc = recipe_orthanc(work / "orthanc", gateway_port, stable_age=2)
    destination = (f"{orthanc.http_url}/dicom-web/studies" if args.dicomweb
                   else f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}")
    gateway = GatewayProcess(work / "gw", model=args.model, port=gateway_port, destinations=[destination])
    wanted = {"sr", "card"} if args.card else {"sr"}
    try:
        print(f"gateway on 127.0.0.1:{gateway_port} (results to {destination}); work folder {work}")
        gateway.start(timeout=300)
        orthanc.start()
        print(f"Orthanc at {orthanc.http_url}; uploading {', '.join(args.files)}")
        for path in files:
            orthanc.upload(path)
        import pydicom

        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        started = time.monotonic()
        try:
            found = wait_until(lambda: (f := returned(orthanc, study_uid)) and wanted <= f.keys() and f,
                               args.timeout, interval=1)
        except TimeoutError:
            print(f"OsteoGate's {', '.join(sorted(wanted))} did not arrive in {args.timeout:.0f} s; gateway log:\n"
                  f"{gateway.log()[-3000:]}", file=sys.stderr)
            return 1
        print(f"results in Orthanc after {time.monotonic() - started:.1f} s: {found}")
        [study] = [s for s in orthanc.post("/tools/lookup", study_uid.encode()) if s["Type"] == "Study"]
        explorer = f"{orthanc.http_url}/app/explorer.html"
        screenshot(f"{explorer}#study?uuid={study['ID']}", args.out / "orthanc_study_explorer.png", args.size, work)
        for kind, instance_id in sorted(found.items()):
            screenshot(f"{explorer}#instance?uuid={instance_id}", args.out / f"orthanc_{kind}_explorer.png",
                       args.size, work)
            if kind != "sr":  # an SR has no pixels to preview
                screenshot(f"{orthanc.http_url}/instances/{instance_id}/preview",
                           args.out / f"orthanc_{kind}_preview.png", args.size, work)
        return 0
    finally:
        orthanc.stop()
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
