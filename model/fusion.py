"""Late fusion of the image score with the header covariates, evaluated from the card's JSON (numpy only).

The fusion head is small on purpose: one linear model per *input situation* (which of image, age,
sex, weight, height a study has), fitted by training/fusion.py and stored in ``card.fusion``:

* a T-score regression ``mu = w . x + c`` (ridge) and a calibrated spread ``sigma``
  (``classifier = {"kind": "normal_t", "sigma": ...}``): together the predictive distribution
  Normal(mu, sigma) of model/estimand.py, from which the estimate, its 80 % interval and every
  probability derive (P(T <= c) = Phi((c - mu) / sigma) through the WHO cut-offs);
* the operating threshold on P(low) chosen on out-of-fold predictions at a stated sensitivity,
  and the grouped-CV figures of that situation (model/gate.py decides from them whether to report).

Features (``FEATURES``) are computed here from ``Covariates`` and the image probabilities, so
training and serving cannot drift apart. Situations are keyed by the inputs available, in
``taxonomy.INPUTS`` order, e.g. ``"image+age+sex+weight+height"``; an entry's ``inputs`` may be
fewer than its key (the image is left out where CV showed it adds nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from osteogate.model.covariates import Covariates
from osteogate.model.estimand import Z80, TScoreDistribution, on_grid
from osteogate.model.taxonomy import CLASSES, INPUTS

FUSION_FORMAT = 1
LOGIT_CLIP = 6.0  # image probabilities of 0.0025 / 0.9975 already say all an image can say


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return max(-LOGIT_CLIP, min(LOGIT_CLIP, math.log(p / (1 - p))))


@dataclass(frozen=True)
class FusionInputs:
    """What one study offers the fusion head: header covariates and (mean) image probabilities."""

    covariates: Covariates
    image_probabilities: Mapping[str, float] | None = None  # calibrated, image alone; None = no image

    @property
    def available(self) -> tuple[str, ...]:
        present = set(self.covariates.present)
        if self.image_probabilities is not None:
            present.add("image")
        return tuple(name for name in INPUTS if name in present)


def _age(x: FusionInputs) -> float | None:
    return x.covariates.age_years


def _hinge(knot: float) -> Callable[[FusionInputs], float | None]:
    def feature(x: FusionInputs) -> float | None:
        age = x.covariates.age_years
        return None if age is None else max(age - knot, 0.0)

    return feature


def _image(which: str) -> Callable[[FusionInputs], float | None]:
    def feature(x: FusionInputs) -> float | None:
        p = x.image_probabilities
        if p is None:
            return None
        value = p["osteoporosis"] if which == "osteoporosis" else p["osteopenia"] + p["osteoporosis"]
        return _logit(value)

    return feature


# name -> (inputs it needs, function). Knots of the age hinges: T-scores fall after the menopause.
FEATURES: dict[str, tuple[tuple[str, ...], Callable[[FusionInputs], float | None]]] = {
    "age": (("age",), _age),
    "age_over_50": (("age",), _hinge(50.0)),
    "age_over_65": (("age",), _hinge(65.0)),
    "female": (("sex",), lambda x: None if x.covariates.sex is None else float(x.covariates.sex == "F")),
    "weight": (("weight",), lambda x: x.covariates.weight_kg),
    "height": (("height",), lambda x: x.covariates.height_m),
    "bmi": (("weight", "height"), lambda x: x.covariates.bmi),
    "image_low_bmd": (("image",), _image("low_bmd")),
    "image_osteoporosis": (("image",), _image("osteoporosis")),
}


def situation_key(inputs: Sequence[str]) -> str:
    """Canonical key of a set of inputs ("none" when empty).

    Parameters
    ----------
    inputs : Sequence[str]
        Input names (``taxonomy.INPUTS``), in any order.

    Returns
    -------
    str
        The names in ``INPUTS`` order joined by "+", e.g. ``"age+sex"``.
    """
    chosen = [name for name in INPUTS if name in set(inputs)]
    return "+".join(chosen) if chosen else "none"


def features_for(inputs: Sequence[str]) -> tuple[str, ...]:
    """Every feature computable from these inputs (FEATURES order).

    Parameters
    ----------
    inputs : Sequence[str]
        Available input names.

    Returns
    -------
    tuple of str
        Feature names.
    """
    have = set(inputs)
    return tuple(name for name, (needs, _) in FEATURES.items() if set(needs) <= have)


def feature_vector(x: FusionInputs, names: Sequence[str]) -> np.ndarray:
    """The raw feature values of one study.

    Parameters
    ----------
    x : FusionInputs
        The study's inputs.
    names : Sequence[str]
        Feature names (``FEATURES``).

    Returns
    -------
    numpy.ndarray
        [F] float64 values.

    Raises
    ------
    ValueError
        On an unknown feature, or one whose input the study lacks.
    """
    values = []
    for name in names:
        if name not in FEATURES:
            raise ValueError(f"unknown fusion feature {name!r}")
        value = FEATURES[name][1](x)
        if value is None:
            raise ValueError(f"fusion feature {name!r} needs an input this study does not have")
        values.append(float(value))
    return np.asarray(values, dtype=np.float64)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)))


def probabilities_from_t(mu: np.ndarray, sigma: float) -> np.ndarray:
    """[N, 3] class probabilities of normal T-score distributions, through the WHO cut-offs.

    Parameters
    ----------
    mu : array_like
        [N] T-score estimates (put them on the reporting grid first: ``on_grid``).
    sigma : float
        The predictive standard deviation.

    Returns
    -------
    numpy.ndarray
        [N, 3] probabilities in ``CLASSES`` order, exactly those of ``TScoreDistribution``.
    """
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    rows = [TScoreDistribution(float(m), float(sigma)).probabilities for m in mu]
    return np.array([[row[c] for c in CLASSES] for row in rows], dtype=np.float64).reshape(len(mu), len(CLASSES))


def sigma_from_quantiles(q_low: float, q_high: float) -> float:
    """The normal spread whose 80 % interval is as wide as the residual 10th-90th percentiles
    (how a card of format 1 without a calibrated ``sigma`` is read as a distribution).

    Parameters
    ----------
    q_low, q_high : float
        The residual 10th and 90th percentiles.

    Returns
    -------
    float
    """
    return max((float(q_high) - float(q_low)) / (2 * Z80), 1e-3)


@dataclass(frozen=True)
class FusionResult:
    """One study's predictive T-score distribution from one head.

    Parameters
    ----------
    distribution : TScoreDistribution
        Normal(estimate, sd); every reported number derives from it.
    """

    distribution: TScoreDistribution

    @property
    def probabilities(self) -> dict[str, float]:
        """The three WHO class probabilities of the distribution."""
        return self.distribution.probabilities

    @property
    def t_score(self) -> float:
        """The estimate (median, on the 0.1 grid)."""
        return self.distribution.estimate

    @property
    def t_score_interval(self) -> tuple[float, float]:
        """The 80 % prediction interval, rounded once."""
        return self.distribution.interval


class FusionHead:
    """One situation's head, from its card entry (see module docstring for the schema).

    The head's output is one predictive distribution of the T-score, Normal(mu, sigma): mu from the
    ridge regression, sigma the calibrated residual scale (``classifier.sigma`` of kind
    ``"normal_t"``). Entries of older cards (kind ``"multinomial"`` or ``"ordinal_t"``) are read
    the same way, sigma from their cross-validated residual quantiles: a 3-class head that could
    disagree with the T-score estimate is no longer evaluated.

    Parameters
    ----------
    entry : Mapping
        The card's ``fusion.situations[key]`` entry.

    Raises
    ------
    ValueError
        When the entry is malformed (missing keys, shapes that do not match its features, unknown
        features or classifier kinds).
    """

    def __init__(self, entry: Mapping[str, Any]) -> None:
        try:
            self.inputs = tuple(entry["inputs"])
            self.features = tuple(entry["features"])
            self.center = np.asarray(entry["center"], dtype=np.float64)
            self.scale = np.asarray(entry["scale"], dtype=np.float64)
            classifier, regression = entry["classifier"], entry["regression"]
            self.kind = str(classifier["kind"])
            self.reg_coef = np.asarray(regression["coef"], dtype=np.float64)
            self.reg_intercept = float(regression["intercept"])
            self.residual_sd = float(regression["residual_sd"])
            q_low, q_high = regression["residual_quantiles"]
            if self.kind == "normal_t":
                self.sigma = float(classifier["sigma"])
            elif self.kind in ("multinomial", "ordinal_t"):
                self.sigma = sigma_from_quantiles(q_low, q_high)
            else:
                raise ValueError(f"unknown classifier kind {self.kind!r}")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed fusion head: {exc!r}") from exc
        n = len(self.features)
        shapes_ok = self.center.shape == (n,) and self.scale.shape == (n,) and self.reg_coef.shape == (n,)
        if not shapes_ok or not np.all(self.scale > 0) or not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"fusion head for {list(self.inputs)}: parameter shapes do not match its features")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"fusion head uses unknown features {unknown}")

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """Standardise [N, F] raw features with the head's centre and scale."""
        return (np.atleast_2d(raw) - self.center) / self.scale

    def predict_raw(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, F] raw features -> ([N, 3] probabilities, [N] T-score estimates on the 0.1 grid).

        Training evaluates heads through this function, so its figures are those of what serving
        reports (the same rounding included)."""
        z = self.standardise(raw)
        mu = np.array([on_grid(float(m)) for m in z @ self.reg_coef + self.reg_intercept], dtype=np.float64)
        return probabilities_from_t(mu, self.sigma), mu

    def interval_raw(self, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 80 % interval endpoints of [N] estimates (rounded once, as reported)."""
        pairs = [TScoreDistribution(float(m), self.sigma).interval for m in np.atleast_1d(mu)]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def predict(self, x: FusionInputs) -> FusionResult:
        """The predictive distribution for one study.

        Parameters
        ----------
        x : FusionInputs
            The study's covariates (and image probabilities when the head uses the image).

        Returns
        -------
        FusionResult

        Raises
        ------
        ValueError
            When the study lacks an input one of the head's features needs.
        """
        z = self.standardise(feature_vector(x, self.features)[None])
        mu = float((z @ self.reg_coef + self.reg_intercept)[0])
        return FusionResult(TScoreDistribution.from_regression(mu, self.sigma))
