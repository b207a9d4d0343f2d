"""Reading a result SR back (``show``, the demo, tests): highdicom parses, this only names things."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from osteogate.gateway.report import wording as reporting
from osteogate.gateway.report.sr_codes import (
    ASSOCIATED_FINDING,
    BODY_HEIGHT,
    BODY_WEIGHT,
    CATEGORY_CODES,
    CLASS_CODES,
    COMMENT,
    DECISION_CODES,
    NOT_ASSESSED_PREFIX,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    RECOMMENDATION,
    SKIPPED_PREFIX,
    SUBJECT_AGE,
    SUBJECT_SEX,
    SUMMARY,
    T_SCORE,
    T_SCORE_CATEGORY,
)
from osteogate.model.estimand import on_grid
from pydicom.sr.codedict import codes

# --- reading back (highdicom parses; we only name things) ------------------------------------

_CLASS_BY_CODE: dict[str, str] = {code.value: name for name, code in CLASS_CODES.items()}
_CATEGORY_BY_CODE: dict[str, str] = {code.value: name for name, code in CATEGORY_CODES.items()}
_DECISION_BY_CODE: dict[str, str] = {code.value: name for name, code in DECISION_CODES.items()}


@dataclass
class GroupReading:
    """One measurement group of a result SR, as read back (``label``: the WHO category of the estimate)."""

    identifier: str
    sites: str
    assessed: bool
    label: str | None
    decision: str | None
    percent: dict[str, float]
    t_score: float | None
    t_interval: tuple[float, float] | None
    inputs: dict[str, str]
    comments: list[str]


@dataclass
class ResultReading:
    """A result SR as read back: the summary, the algorithm, the groups and the container notes."""

    summary: str
    algorithm: str
    groups: list[GroupReading]
    notes: list[str]  # the Qualitative Evaluations texts (disclaimer, skipped images)


def _code_value(item: pydicom.Dataset, keyword: str) -> str:
    sequence = item.get(keyword)
    return str(sequence[0].CodeValue) if sequence else ""


def _num(item: hd.sr.NumContentItem) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def _read_group(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> GroupReading:
    percent: dict[str, float] = {}
    inputs: dict[str, str] = {}
    t_score = None
    t_interval = None
    for measurement in group.get_measurements():
        name = measurement.name.value
        if name == PROBABILITY.value:
            finding = hd.sr.utils.find_content_items(measurement[0], name=ASSOCIATED_FINDING)
            cls = _code_value(finding[0], "ConceptCodeSequence") if finding else ""
            percent[_CLASS_BY_CODE.get(cls, cls)] = float(measurement.value)
        elif name == T_SCORE.value:
            t_score = float(measurement.value)
            upper = hd.sr.utils.find_content_items(measurement[0], name=codes.SCT.RangeOfUpperMeasurementUncertainty)
            lower = hd.sr.utils.find_content_items(measurement[0], name=codes.SCT.RangeOfLowerMeasurementUncertainty)
            if upper and lower:
                t_interval = (on_grid(t_score - _num(lower[0])), on_grid(t_score + _num(upper[0])))
        elif name == SUBJECT_AGE.value:
            inputs["age"] = f"{measurement.value:g} y"
        elif name == BODY_WEIGHT.value:
            inputs["weight"] = f"{measurement.value:g} kg"
        elif name == BODY_HEIGHT.value:
            inputs["height"] = f"{measurement.value:g} m"
    label = decision = None
    for evaluation in group.get_qualitative_evaluations():
        if evaluation.name.value == SUBJECT_SEX.value:
            inputs["sex"] = str(evaluation.value.meaning).lower()
        elif evaluation.name.value == T_SCORE_CATEGORY.value:
            label = _CATEGORY_BY_CODE.get(evaluation.value.value)
        elif evaluation.name.value == RECOMMENDATION.value:
            decision = _DECISION_BY_CODE.get(evaluation.value.value)
    evaluated = label is not None
    comments = [
        str(item.TextValue)
        for item in hd.sr.utils.find_content_items(group[0], name=COMMENT, value_type="TEXT")
    ]
    sites = ", ".join(
        " ".join([str(site.value.meaning), *(str(m.ConceptCodeSequence[0].CodeMeaning)
                                              for m in site.get("ContentSequence", []))])
        for site in group.finding_sites
    )
    return GroupReading(str(group.tracking_identifier), sites, evaluated, label, decision, percent, t_score,
                        t_interval, inputs, comments)


def read_result(ds: pydicom.Dataset) -> ResultReading:
    """Parse an OsteoGate result SR with highdicom.

    Parameters
    ----------
    ds : pydicom.Dataset
        The SR.

    Returns
    -------
    ResultReading

    Raises
    ------
    ValueError, AttributeError, KeyError
        On SRs that are not TID 1500 (highdicom's errors).
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    root = sr.content[0]
    summary = " ".join(str(i.TextValue) for i in hd.sr.utils.find_content_items(root, name=SUMMARY))
    groups = report.get_image_measurement_groups()
    algorithm = ""
    if groups:
        name, version, params = (
            [str(i.TextValue) for i in hd.sr.utils.find_content_items(groups[0][0], name=code)]
            for code in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)
        )
        algorithm = f"{' '.join(name)} version {' '.join(version)}" + (f" ({'; '.join(params)})" if params else "")
    notes: list[str] = []
    for container in hd.sr.utils.find_content_items(root, name=QUALITATIVE_EVALUATIONS, value_type="CONTAINER"):
        notes += [str(t.TextValue) for t in hd.sr.utils.find_content_items(container, value_type="TEXT")]
    return ResultReading(summary, algorithm, [_read_group(g) for g in groups], notes)


def _group_line(group: GroupReading) -> str:
    if group.assessed:
        probs = ", ".join(f"{reporting.PROBABILITY_WORDS.get(k, k)} {v:g} %" for k, v in group.percent.items())
        result = f"{group.decision or 'no decision'}; {reporting.CATEGORY_WORDS.get(str(group.label), group.label)}"
        result += f" ({probs})" if probs else ""
    else:
        reason = next((c.removeprefix(NOT_ASSESSED_PREFIX) for c in group.comments
                       if c.startswith(NOT_ASSESSED_PREFIX)), "no reason recorded")
        result = f"not assessed: {reason}"
    line = f"{group.identifier} [{group.sites}]: {result}"
    if group.t_score is not None:
        line += f"; T-score {reporting.fmt_t_score(group.t_score)}"
        if group.t_interval:
            line += f" (80 % interval {reporting.fmt_t_score(group.t_interval[0])} to {reporting.fmt_t_score(group.t_interval[1])})"
    inputs = next((c for c in group.comments if c.startswith("Inputs used")), "")
    if inputs:
        line += f"; {inputs[0].lower()}{inputs[1:]}"
    if group.inputs:
        line += " [" + ", ".join(f"{k} {v}" for k, v in group.inputs.items()) + "]"
    return line


def _summary_from_tree(items: Sequence[pydicom.Dataset], depth: int = 0) -> list[str]:
    """Fallback for SRs highdicom cannot parse as TID 1500: every item as "name: value"."""
    lines: list[str] = []
    for item in items:
        names = item.get("ConceptNameCodeSequence")
        name = str(names[0].CodeMeaning) if names else ""
        value_type = str(item.get("ValueType", ""))
        if value_type == "NUM" and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            units = measured.get("MeasurementUnitsCodeSequence")
            value = f"{measured.NumericValue} {units[0].CodeMeaning if units else ''}".rstrip()
        elif value_type == "CODE":
            concept = item.get("ConceptCodeSequence")
            value = str(concept[0].CodeMeaning) if concept else ""
        elif value_type in ("TEXT", "UIDREF"):
            value = str(item.get("TextValue", item.get("UID", "")))
        else:
            value = ""
        lines.append(f"{'  ' * depth}{name}: {value}".rstrip(": "))
        lines.extend(_summary_from_tree(item.get("ContentSequence", []), depth + 1))
    return lines


def sr_summary(ds: pydicom.Dataset) -> str:
    """Human-readable multi-line summary of an OsteoGate result SR (or, degraded, any SR).

    Parameters
    ----------
    ds : pydicom.Dataset
        An SR.

    Returns
    -------
    str
    """
    header = [
        f"{ds.get('SeriesDescription', 'Structured report')}: instance {ds.get('InstanceNumber', '?')}, "
        f"content {ds.get('ContentDate', '')} {ds.get('ContentTime', '')}".rstrip(),
        f"Completion {ds.get('CompletionFlag', '?')}, verification {ds.get('VerificationFlag', '?')}, "
        f"{ds.get('PreliminaryFlag', 'no preliminary flag')}",
    ]
    try:
        reading = read_result(ds)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        # Not a TID 1500 report highdicom understands (e.g. another vendor's SR): still show it.
        return "\n".join([*header, *_summary_from_tree(ds.get("ContentSequence", []))])
    body = [f"Summary: {reading.summary}"] if reading.summary else []
    if reading.algorithm:
        body.append(f"Algorithm: {reading.algorithm}")
    body += [_group_line(g) for g in reading.groups]
    body += [f"Skipped: {n.removeprefix(SKIPPED_PREFIX)}" if n.startswith(SKIPPED_PREFIX) else n
             for n in reading.notes]
    return "\n".join([*header, *body])
