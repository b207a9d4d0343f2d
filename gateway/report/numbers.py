"""The numbers every report prints, formatted once: whole percentages that add up to 100, T-scores
and their 80 % interval (already rounded once by the model, model/estimand.py; only formatted here).
Re-exported by gateway/report/wording.py."""

from __future__ import annotations

import math
from collections.abc import Mapping

from osteogate.model.assessment import Assessment
from osteogate.model.taxonomy import CLASSES, LOW_BMD_CLASSES

# The class probabilities named by their T-score ranges (SR comments, card bars, ``show``).
PROBABILITY_WORDS = {"normal": "T >= -1.0", "osteopenia": "osteopenia range", "osteoporosis": "osteoporosis range"}


def probability_phrase(probabilities: Mapping[str, float]) -> str:
    """ "T >= -1.0 10 %, osteopenia range 77 %, osteoporosis range 13 %" (whole percentages).

    Parameters
    ----------
    probabilities : Mapping[str, float]
        Class probabilities.

    Returns
    -------
    str
    """
    rounded = percentages(probabilities)
    return ", ".join(f"{PROBABILITY_WORDS.get(name, name)} {rounded[name]} %" for name in CLASSES)


def percentages(probabilities: Mapping[str, float]) -> dict[str, int]:
    """Whole percentages that add up to 100 (largest-remainder rounding), in CLASSES order.

    Calibrated probabilities do not support more than whole percent, and a card whose three bars
    read 33 + 33 + 33 looks broken; each value is its exact percentage rounded down or up.

    Parameters
    ----------
    probabilities : Mapping[str, float]
        Class probabilities.

    Returns
    -------
    dict of str to int
    """
    values = {name: max(0.0, float(probabilities.get(name, 0.0))) for name in CLASSES}
    total = sum(values.values())
    if total <= 0 or not math.isfinite(total):
        return {name: 0 for name in CLASSES}
    exact = {name: 100.0 * value / total for name, value in values.items()}
    floors = {name: math.floor(value) for name, value in exact.items()}
    short = 100 - sum(floors.values())
    # Ties broken by class order, so the result is deterministic.
    by_remainder = sorted(CLASSES, key=lambda n: (-(exact[n] - floors[n]), CLASSES.index(n)))
    for name in by_remainder[:short]:
        floors[name] += 1
    return floors


def low_bmd_percent(probabilities: Mapping[str, float]) -> int:
    """low_bmd_percent

    Parameters
    ----------
    probabilities : Mapping[str, float]
        Class probabilities.

    Returns
    -------
    int
        The whole-percent P(osteopenia) + P(osteoporosis) as displayed.
    """
    rounded = percentages(probabilities)
    return sum(rounded[name] for name in LOW_BMD_CLASSES)


def fmt_t_score(value: float) -> str:
    """A T-score already on the 0.1 grid as text: "-1.9", "+0.4", "0.0".

    Parameters
    ----------
    value : float
        The value (the model rounded it once; this only formats).

    Returns
    -------
    str
        One decimal with an ASCII sign (a typographic minus would not survive every PACS font).
    """
    return f"{value:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0")


def interval_text(low: float, high: float) -> tuple[str, str]:
    """The two printed endpoints of an interval already rounded once ("-2.4", "-1.4").

    Parameters
    ----------
    low, high : float
        Endpoints already on the 0.1 grid.

    Returns
    -------
    tuple of str
    """
    return fmt_t_score(low), fmt_t_score(high)


def interval_endpoints(assessment: Assessment) -> tuple[str, str] | None:
    """The 80 % interval as the two printed endpoints: the one helper the SR, the card and ``show`` use.

    Parameters
    ----------
    assessment : Assessment
        A result; its ``t_score_interval`` was rounded once by the model.

    Returns
    -------
    tuple of str or None
        ("-2.4", "-1.4"), or None without an interval.
    """
    if assessment.t_score_interval is None:
        return None
    return interval_text(*assessment.t_score_interval)


def interval_phrase(assessment: Assessment, *, long: bool = True) -> str | None:
    """ "80 % interval -2.4 to -1.4" (``long``) or "-2.4 to -1.4".

    Parameters
    ----------
    assessment : Assessment
        A result.
    long : bool
        Prefix "80 % interval".

    Returns
    -------
    str or None
    """
    ends = interval_endpoints(assessment)
    if ends is None:
        return None
    return ("80 % interval " if long else "") + f"{ends[0]} to {ends[1]}"


def t_score_text(assessment: Assessment) -> str | None:
    """ "Estimated T-score -1.9 (80 % interval -2.4 to -1.4)", or None without an estimate.

    Parameters
    ----------
    assessment : Assessment
        A result.

    Returns
    -------
    str or None
    """
    if assessment.t_score is None:
        return None
    text = f"Estimated T-score {fmt_t_score(assessment.t_score)}"
    interval = interval_phrase(assessment)
    return text + (f" ({interval})" if interval else "")
