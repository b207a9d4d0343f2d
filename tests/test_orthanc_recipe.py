"""deploy/orthanc: Orthanc forwards knee/spine studies to OsteoGate and receives the results back.

An Orthanc runs with exactly the recipe's configuration and Lua script (only ports, folders, the
gateway's address and a shorter StableAge differ: see tests/helpers/orthanc.py recipe_orthanc),
`osteogate serve` runs as a process pointing back at it by C-STORE, studies are uploaded into
Orthanc through its REST API as a user would, and the test waits until Orthanc holds OsteoGate's
results in the same study. The compose file is checked to wire the same files and addresses.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from osteogate.gateway.core.config import load_settings

from tests.gateway_harness import GatewayProcess
from tests.helpers import (
    OrthancServer,
    dicomweb_plugin,
    free_port,
    orthanc_binary,
    recipe_orthanc,
    sample_file,
    wait_until,
)
from tests.helpers.orthanc import GATEWAY_MODALITY, RECIPE_CONFIG, RECIPE_LUA

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
EXAMPLE = DEPLOY / "osteogate.example.toml"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC Image and the multi-frame SC classes
OWN_MANUFACTURER = "OsteoGate"
STABLE_AGE = 2  # the recipe says 10 s; the test need not wait that long


# -- what OsteoGate sends back, as Orthanc shows it ---------------------------------------------------


def osteogate_sr(tags: dict[str, Any]) -> bool:
    return tags.get("SOPClassUID") == COMPREHENSIVE_3D_SR and tags.get("Manufacturer") == OWN_MANUFACTURER


def osteogate_card(tags: dict[str, Any]) -> bool:
    """The result card: a Secondary Capture image made by OsteoGate."""
    return str(tags.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX) and \
        tags.get("Manufacturer") == OWN_MANUFACTURER


# Every kind of result the recipe must bring back into the study: the SR and the result card.
RETURNED: list[Callable[[dict[str, Any]], bool]] = [osteogate_sr, osteogate_card]


# -- configuration consistency (text checks, no Docker engine) ---------------------------------------


def _recipe() -> dict[str, Any]:
    return json.loads(RECIPE_CONFIG.read_text(encoding="utf-8"))


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} with an empty environment."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m[1] or "", value)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if parts[0].startswith("."):
            mounts[parts[1]] = parts[0]
    return mounts


def test_recipe_lua_filters_and_never_forwards_our_own_objects() -> None:
    lua = RECIPE_LUA.read_text(encoding="utf-8")
    assert "function OnStableStudy(" in lua
    assert f"local TARGET = '{GATEWAY_MODALITY}'" in lua
    assert f"local OWN_MANUFACTURER = '{OWN_MANUFACTURER}'" in lua
    assert "CR = true, DX = true" in lua
    recipe = _recipe()
    assert "OsteoGateForwarded" in recipe["UserMetadata"] and "'OsteoGateForwarded'" in lua


def test_recipe_is_safe_when_run_without_docker() -> None:
    """`Orthanc deploy/orthanc/orthanc.json` on a host: HTTP (REST, Explorer, DICOMweb) answers
    this host only, or asks for a password; never open to the network without a login."""
    recipe = _recipe()
    assert recipe["RemoteAccessAllowed"] is False or recipe["AuthenticationEnabled"] is True, recipe
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert '"RemoteAccessAllowed": true' in readme and "RegisteredUsers" in readme  # how to change it


def test_compose_orthanc_runs_the_recipe_and_the_gateway_points_back() -> None:
    services = _compose()["services"]
    orthanc, gateway = services["orthanc"], services["gateway"]
    recipe = _recipe()
    # Orthanc gets the recipe's files, at the paths the recipe names.
    mounts = _mounts(orthanc)
    assert mounts.get("/etc/orthanc/orthanc.json", "").endswith("orthanc/orthanc.json")
    assert (DEPLOY / mounts["/etc/orthanc/orthanc.json"]).resolve() == RECIPE_CONFIG
    [lua_path] = recipe["LuaScripts"]
    assert (DEPLOY / mounts[lua_path]).resolve() == RECIPE_LUA
    assert any(str(v).endswith(":" + recipe["StorageDirectory"]) for v in orthanc["volumes"])
    # No ORTHANC__ variable restates (and could contradict) a recipe setting, except opening HTTP
    # to the container network (every caller of a container is remote), published on loopback.
    environment = orthanc.get("environment", {})
    assert [k for k in environment if k.startswith("ORTHANC__")] == ["ORTHANC__REMOTE_ACCESS_ALLOWED"], environment
    assert "127.0.0.1:8042:8042" in orthanc["ports"]
    assert environment.get("DICOM_WEB_PLUGIN_ENABLED") == "true"  # the recipe's DicomWeb section needs it
    # Ports published are the recipe's.
    assert f"{recipe['DicomPort']}:{recipe['DicomPort']}" in orthanc["ports"]
    assert any(str(p).endswith(f"{recipe['HttpPort']}:{recipe['HttpPort']}") for p in orthanc["ports"])
    # Orthanc -> gateway: the modality is the gateway service with its AE title and port.
    aet, host, port = recipe["DicomModalities"][GATEWAY_MODALITY]
    env = {k: _interpolate(str(v)) for k, v in gateway["environment"].items() if k.startswith("OSTEOGATE_")}
    settings = load_settings(EXAMPLE, environ=env)
    assert host == "gateway" and (aet, port) == (settings.dicom.ae_title, settings.dicom.port)
    assert f"{port}:{port}" in gateway["ports"]
    assert recipe["DicomAet"] in settings.dicom.allowed_calling_aets
    # gateway -> Orthanc: its destination is the orthanc service, by C-STORE to the recipe's
    # DicomAet/DicomPort (or by DICOMweb at the recipe's root).
    web_root = recipe["DicomWeb"]["Root"].strip("/")
    allowed = {f"{recipe['DicomAet']}@orthanc:{recipe['DicomPort']}",
               f"http://orthanc:{recipe['HttpPort']}/{web_root}/studies"}
    assert settings.delivery.destinations
    assert {str(d) for d in settings.delivery.destinations} <= allowed


# -- the live round trip --------------------------------------------------------------------------------


@dataclass
class Routed:
    orthanc: OrthancServer
    gateway: GatewayProcess
    study_uid: str  # the knee study uploaded into Orthanc
    other_study_uid: str  # a chest study uploaded beside it: never forwarded
    study_id: str  # Orthanc's ID of the knee study
    knee_series: set[str]  # SeriesInstanceUIDs of the knee images

    def results(self) -> list[dict[str, Any]]:
        """Tags of the OsteoGate objects in the knee study."""
        found = []
        for instance in self.orthanc.study_instances(self.study_uid):
            tags = self.orthanc.instance_tags(instance["ID"])
            if tags.get("Manufacturer") == OWN_MANUFACTURER:
                found.append(tags)
        return found

    def store_jobs(self) -> list[dict[str, Any]]:
        return [j for j in self.orthanc.get("/jobs?expand") if j.get("Type") == "DicomModalityStore"]


def _all_returned(routed: Routed) -> list[dict[str, Any]] | None:
    results = routed.results()
    return results if all(any(kind(tags) for tags in results) for kind in RETURNED) else None


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Routed]:
    """Orthanc (the recipe) + `osteogate serve` pointing back at it; a knee study and a chest
    study uploaded into Orthanc; returns once every kind in RETURNED is in the knee study."""
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc with the DICOMweb plugin (orthanc, orthanc-dicomweb) not installed")
    root = tmp_path_factory.mktemp("recipe")
    gateway_port = free_port()
    orthanc = recipe_orthanc(root / "orthanc", gateway_port, stable_age=STABLE_AGE)
    gateway = GatewayProcess(root / "gw", model=tiny_model, port=gateway_port,
                             destinations=[f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}"])
    knee = [sample_file("knee_dx.dcm"), sample_file("knee_dx_2.dcm")]
    chest = sample_file("chest_dx.dcm")
    gateway.start()
    try:
        orthanc.start()
        try:
            for path in [*knee, chest]:
                orthanc.upload(path)
            study_uid = str(pydicom.dcmread(knee[0]).StudyInstanceUID)
            [study] = [s for s in orthanc.post("/tools/lookup", study_uid.encode()) if s["Type"] == "Study"]
            routed = Routed(orthanc, gateway, study_uid, str(pydicom.dcmread(chest).StudyInstanceUID), study["ID"],
                            {str(pydicom.dcmread(p).SeriesInstanceUID) for p in knee})
            try:
                wait_until(lambda: _all_returned(routed), 120, interval=1)
            except TimeoutError:
                raise AssertionError(f"results never came back.\nOrthanc:\n{orthanc.log()}\n"
                                     f"Gateway:\n{gateway.log()[-4000:]}") from None
            yield routed
        finally:
            orthanc.stop()
    finally:
        gateway.stop()


@pytest.mark.orthanc
def test_orthanc_forwards_knee_study_and_gets_the_results_back(routed: Routed) -> None:
    results = routed.results()
    [sr] = [tags for tags in results if osteogate_sr(tags)]
    assert sr["StudyInstanceUID"] == routed.study_uid
    assert sr["Modality"] == "SR"
    # Orthanc filed the SR in the very study it forwarded (same Orthanc study, own series).
    series = [routed.orthanc.get(f"/series/{s}")
              for s in {i["ParentSeries"] for i in routed.orthanc.study_instances(routed.study_uid)}]
    assert {s["ParentStudy"] for s in series} == {routed.study_id}
    # The images' series as sent, and every other series of the study is OsteoGate's own.
    ours = [s for s in series if s["MainDicomTags"]["SeriesInstanceUID"] not in routed.knee_series]
    assert len(series) - len(ours) == len(routed.knee_series)
    assert {s["MainDicomTags"].get("Manufacturer") for s in ours} == {OWN_MANUFACTURER}
    assert sr["SeriesInstanceUID"] in {s["MainDicomTags"]["SeriesInstanceUID"] for s in ours}
    # The Lua script forwarded (one job, the knee series only); the chest study stayed home.
    assert f"OsteoGate: forwarding {len(routed.knee_series)} series of study {routed.study_id}" in routed.orthanc.log()
    studies = routed.gateway.studies()
    assert [s["study_uid"] for s in studies] == [routed.study_uid], studies
    # The normal path is silent: no error line from the script (an absent metadata lookup was one).
    assert _error_lines(routed.orthanc.log()) == []


def _error_lines(log: str) -> list[str]:
    """Orthanc's error lines (glog style: E1203 06:50:01.123 ...)."""
    return [line for line in log.splitlines() if re.match(r"E\d{4} ", line)]


@pytest.mark.orthanc
def test_forward_made_while_the_gateway_is_down_is_retried_by_itself(tmp_path: Path, tiny_model: Path) -> None:
    """Orthanc runs before the gateway: the forward fails, the script resubmits the job after
    its wait, and once the gateway is up the results come back with no one resubmitting."""
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc with the DICOMweb plugin (orthanc, orthanc-dicomweb) not installed")
    gateway_port = free_port()
    orthanc = recipe_orthanc(tmp_path / "orthanc", gateway_port, stable_age=1)
    assert orthanc.base_config is not None
    orthanc.base_config["OsteoGateRetrySeconds"] = 1  # the recipe's 10 s, shortened for the test
    knee = sample_file("knee_dx.dcm")
    study_uid = str(pydicom.dcmread(knee).StudyInstanceUID)
    gateway = GatewayProcess(tmp_path / "gw", model=tiny_model, port=gateway_port,
                             destinations=[f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}"])
    orthanc.start()
    try:
        orthanc.upload(knee)
        wait_until(lambda: "failed (attempt 1" in orthanc.log(), 60, interval=0.5)
        gateway.start()
        try:
            def returned() -> bool:
                return any(orthanc.instance_tags(i["ID"]).get("Manufacturer") == OWN_MANUFACTURER
                           for i in orthanc.study_instances(study_uid))
            try:
                wait_until(returned, 120, interval=1)
            except TimeoutError:
                raise AssertionError(f"results never came back.\nOrthanc:\n{orthanc.log()[-4000:]}\n"
                                     f"Gateway:\n{gateway.log()[-4000:]}") from None
        finally:
            gateway.stop()
        jobs = [j for j in orthanc.get("/jobs?expand") if j.get("Type") == "DicomModalityStore"]
        assert len(jobs) == 1 and jobs[0]["State"] == "Success", jobs  # the same job, resubmitted
        assert "succeeded after" in orthanc.log()
        assert orthanc.log().count("OsteoGate: forwarding") == 1
    finally:
        orthanc.stop()


@pytest.mark.orthanc
def test_results_arriving_do_not_forward_the_study_again(routed: Routed) -> None:
    """Our SR makes the study change, so Orthanc calls OnStableStudy again; the series-count
    marker keeps it from sending the images a second time (and the SR is never sent)."""
    jobs = routed.store_jobs()
    time.sleep(STABLE_AGE + 3)  # past the stable age after the results arrived, and then some
    assert [j["ID"] for j in routed.store_jobs()] == [j["ID"] for j in jobs]
    assert len(jobs) == 1 and jobs[0]["State"] == "Success"
    assert jobs[0]["Content"]["InstancesCount"] == 2 and jobs[0]["Content"]["FailedInstancesCount"] == 0
    assert routed.orthanc.log().count("OsteoGate: forwarding") == 1


@pytest.mark.orthanc
def test_whole_study_resend_from_orthanc_succeeds_without_a_new_result(routed: Routed) -> None:
    """A common routing rule: Orthanc sends the whole study, which now holds our SR (and card),
    to OsteoGate again. Every instance must be accepted, and nothing new must come back."""
    before = routed.gateway.studies()
    try:
        answer = routed.orthanc.post(f"/modalities/{GATEWAY_MODALITY}/store",
                                     {"Resources": [routed.study_id], "Synchronous": True}, timeout=120)
    except urllib.error.HTTPError as exc:
        pytest.fail(f"Orthanc's whole-study send failed: HTTP {exc.code} {exc.read()[:300]!r}")
    instances = routed.orthanc.study_instances(routed.study_uid)
    assert int(answer["InstancesCount"]) == len(instances)
    assert int(answer.get("FailedInstancesCount", 0)) == 0
    time.sleep(5)  # a new SR would need stable_seconds (1) plus classification
    after = routed.gateway.studies()
    assert [s.get("sr_versions") for s in after] == [s.get("sr_versions") for s in before]
    assert len([t for t in routed.results() if osteogate_sr(t)]) == 1


@pytest.mark.orthanc
def test_heartbeat_path_resubmits_a_failed_forward_without_sleeping(tmp_path: Path, tiny_model: Path) -> None:
    """Orthanc >= 1.11.2 calls OnHeartBeat every LuaHeartBeatPeriod s; this Orthanc (1.10) does
    not, so the test calls it as Orthanc would, through /tools/execute-script (the scripts' own
    Lua context). A failed forward then waits on a due time and is resubmitted at a heartbeat."""
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc with the DICOMweb plugin (orthanc, orthanc-dicomweb) not installed")
    assert _recipe().get("LuaHeartBeatPeriod", 0) > 0
    gateway_port = free_port()
    orthanc = recipe_orthanc(tmp_path / "orthanc", gateway_port, stable_age=1)
    assert orthanc.base_config is not None
    orthanc.base_config["OsteoGateRetrySeconds"] = 1
    orthanc.base_config["ExecuteLuaEnabled"] = True  # test only: lets the test be the heartbeat

    def heartbeat() -> None:
        orthanc._request("/tools/execute-script", data=b"OnHeartBeat()", method="POST",
                         content_type="text/plain", timeout=10)

    knee = sample_file("knee_dx.dcm")
    study_uid = str(pydicom.dcmread(knee).StudyInstanceUID)
    gateway = GatewayProcess(tmp_path / "gw", model=tiny_model, port=gateway_port,
                             destinations=[f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}"])
    orthanc.start()
    try:
        heartbeat()  # Orthanc says it has a heartbeat: no more sleeping in the Lua thread
        orthanc.upload(knee)
        wait_until(lambda: "failed (attempt 1" in orthanc.log(), 60, interval=0.5)
        started = time.monotonic()
        heartbeat()  # answers at once: OnJobFailure returned instead of sleeping
        assert time.monotonic() - started < 0.9
        gateway.start()
        try:
            def returned() -> bool:
                heartbeat()
                return any(orthanc.instance_tags(i["ID"]).get("Manufacturer") == OWN_MANUFACTURER
                           for i in orthanc.study_instances(study_uid))
            try:
                wait_until(returned, 120, interval=1)
            except TimeoutError:
                raise AssertionError(f"never resubmitted.\nOrthanc:\n{orthanc.log()[-4000:]}") from None
        finally:
            gateway.stop()
        jobs = [j for j in orthanc.get("/jobs?expand") if j.get("Type") == "DicomModalityStore"]
        assert len(jobs) == 1 and jobs[0]["State"] == "Success", jobs
    finally:
        orthanc.stop()
