"""The one estimand: the predictive distribution of the densitometry T-score given the inputs used.

Every number a result states derives from one ``TScoreDistribution`` (a normal distribution whose
mean is the ridge regression's estimate and whose spread is the head's cross-validated, calibrated
residual scale), so they cannot disagree:

* the estimate is the distribution's median (= mean), rounded once to the 0.1 grid DXA reports use;
* the 80 % interval is its 10th to 90th percentile, rounded once (``interval``; the SR, the card
  and ``show`` all print these two endpoints);
* P(low bone density) = P(T < -1.0) and P(osteoporosis range) = P(T <= -2.5); the three WHO class
  probabilities are P(T >= -1.0), P(-2.5 < T < -1.0) and P(T <= -2.5);
* the WHO category named is the category of the estimate, so P(low) >= 0.5 exactly when the
  estimate is below -1.0 and P(osteoporosis range) >= 0.5 exactly when it is at or below -2.5;
* the screening decision compares P(low) with the operating threshold chosen inside the training
  folds (``referral_decision``): "DXA referral suggested" or "below the referral threshold", never
  "normal" or "not detected".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from osteogate.model.taxonomy import CLASSES, T_SCORE_OSTEOPENIA, T_SCORE_OSTEOPOROSIS, class_from_t_score

# Phi^-1(0.9): the 80 % central interval of a normal distribution is mean +- Z80 * sd.
Z80 = 1.2815515655446004
INTERVAL_LEVEL = 0.80
DECIMALS = 1  # the precision DXA reports T-scores in; the estimate and the interval are rounded once to it
REFERRAL = "DXA referral suggested"
BELOW_THRESHOLD = "below the referral threshold"
DECISIONS = (REFERRAL, BELOW_THRESHOLD)


def on_grid(value: float) -> float:
    """``value`` rounded to the reporting grid (0.1), the one rounding every T-score figure gets.

    Parameters
    ----------
    value : float
        A T-score (estimate or interval endpoint) in full precision.

    Returns
    -------
    float
        The value rounded half away from zero to one decimal (never ``-0.0``).
    """
    scaled = abs(float(value)) * 10**DECIMALS
    rounded = math.floor(scaled + 0.5) / 10**DECIMALS
    rounded = math.copysign(rounded, float(value))
    return 0.0 if rounded == 0 else rounded


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class TScoreDistribution:
    """Normal(``estimate``, ``sd``): the predictive distribution of the T-score given the inputs used.

    Parameters
    ----------
    estimate : float
        The median T-score, already on the reporting grid (use ``from_regression``).
    sd : float
        The calibrated predictive standard deviation (> 0).

    Raises
    ------
    ValueError
        When ``sd`` is not positive and finite or ``estimate`` is not finite.
    """

    estimate: float
    sd: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.estimate) and math.isfinite(self.sd) and self.sd > 0):
            raise ValueError(f"a T-score distribution needs a finite estimate and sd > 0, got {self.estimate}, {self.sd}")

    @classmethod
    def from_regression(cls, mu: float, sd: float) -> TScoreDistribution:
        """The distribution of a head's regression output ``mu`` (rounded once to the grid).

        Parameters
        ----------
        mu : float
            The regression's T-score estimate in full precision.
        sd : float
            The head's calibrated predictive standard deviation.

        Returns
        -------
        TScoreDistribution
        """
        return cls(on_grid(mu), float(sd))

    def cdf(self, t: float) -> float:
        """P(T <= t)."""
        return _normal_cdf((t - self.estimate) / self.sd)

    @property
    def p_low(self) -> float:
        """P(T < -1.0): low bone density (osteopenia or osteoporosis range).

        An estimate exactly on -1.0 is in the normal range (WHO: -1.0 or above) while the symmetric
        distribution gives exactly one half; the value is then 2**-53 below 0.5 (so that 1 - P(low),
        P(normal range), is exactly representable above 0.5), and P(low) >= 0.5 holds exactly when
        the estimate is below -1.0.
        """
        p = self.cdf(T_SCORE_OSTEOPENIA)
        return 0.5 - 2.0**-53 if self.estimate == T_SCORE_OSTEOPENIA else p

    @property
    def p_osteoporosis(self) -> float:
        """P(T <= -2.5): the osteoporosis range."""
        return min(self.cdf(T_SCORE_OSTEOPOROSIS), self.p_low)

    @property
    def probabilities(self) -> dict[str, float]:
        """The three WHO class probabilities (``taxonomy.CLASSES`` order), summing to 1."""
        p_low, p_op = self.p_low, self.p_osteoporosis
        return dict(zip(CLASSES, (1.0 - p_low, p_low - p_op, p_op), strict=True))

    @property
    def category(self) -> str:
        """The WHO category of the estimate (the one a result names)."""
        return class_from_t_score(self.estimate)

    @property
    def interval(self) -> tuple[float, float]:
        """The 80 % prediction interval, endpoints rounded once to the grid."""
        half = Z80 * self.sd
        return on_grid(self.estimate - half), on_grid(self.estimate + half)


def category_from_probabilities(probabilities: Mapping[str, float]) -> str:
    """The median WHO class of an ordinal distribution given only class probabilities.

    For results without a T-score (an image-only network): osteoporosis range when
    P(osteoporosis) >= 0.5, low bone density (osteopenia range) when P(low) >= 0.5, else normal
    range: the same rule as the category of a T-score estimate.

    Parameters
    ----------
    probabilities : Mapping[str, float]
        Calibrated probabilities keyed by ``taxonomy.CLASSES``.

    Returns
    -------
    str
        One of ``taxonomy.CLASSES``.
    """
    p_op = float(probabilities.get("osteoporosis", 0.0))
    p_low = p_op + float(probabilities.get("osteopenia", 0.0))
    if p_op >= 0.5:
        return "osteoporosis"
    return "osteopenia" if p_low >= 0.5 else "normal"


def referral_decision(p_low: float, threshold: float | None) -> str:
    """The screening decision: ``REFERRAL`` when P(low) reaches the operating threshold.

    Parameters
    ----------
    p_low : float
        P(T < -1.0) of the result.
    threshold : float or None
        The operating threshold on P(low) chosen inside the training folds; ``None`` (a card
        without one) falls back to 0.5, the estimate's own category.

    Returns
    -------
    str
        ``REFERRAL`` or ``BELOW_THRESHOLD``.
    """
    cut = 0.5 if threshold is None else float(threshold)
    return REFERRAL if p_low >= cut else BELOW_THRESHOLD
