"""Late fusion of the image score with the header covariates, evaluated from the card's JSON (numpy only).

The fusion head is small on purpose: one linear model per *input situation* (which of image, age,
sex, weight, height a study has), fitted by training/fusion.py and stored in ``card.fusion``:

* a 3-class head: multinomial logistic ``softmax(W x + b)`` (``kind = "multinomial"``), or the
  T-score regression read through the WHO cut-offs (``kind = "ordinal_t"``:
  P(T <= c) = Phi((c - mu) / sigma)), whichever grouped CV chose;
* a T-score regression ``mu = w . x + c`` with an 80 % prediction interval ``mu + [q10, q90]`` from
  cross-validated residuals (a point estimate alone over-claims);
* operating thresholds chosen on out-of-fold predictions at a stated sensitivity, and the
  grouped-CV figures of that situation (model/gate.py decides from them whether to report).

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
from osteogate.model.taxonomy import CLASSES, INPUTS, T_SCORE_OSTEOPENIA, T_SCORE_OSTEOPOROSIS

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
    """Canonical key of a set of inputs ("none" when empty)."""
    chosen = [name for name in INPUTS if name in set(inputs)]
    return "+".join(chosen) if chosen else "none"


def features_for(inputs: Sequence[str]) -> tuple[str, ...]:
    """Every feature computable from these inputs (FEATURES order)."""
    have = set(inputs)
    return tuple(name for name, (needs, _) in FEATURES.items() if set(needs) <= have)


def feature_vector(x: FusionInputs, names: Sequence[str]) -> np.ndarray:
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
    """[N, 3] class probabilities of a Gaussian T-score estimate, through the WHO cut-offs."""
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    p_op = _normal_cdf((T_SCORE_OSTEOPOROSIS - mu) / sigma)
    p_low = _normal_cdf((T_SCORE_OSTEOPENIA - mu) / sigma)
    return np.stack([1.0 - p_low, p_low - p_op, p_op], axis=1).clip(0.0, 1.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class FusionResult:
    probabilities: dict[str, float]
    t_score: float
    t_score_interval: tuple[float, float]


class FusionHead:
    """One situation's head, from its card entry (see module docstring for the schema)."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        try:
            self.inputs = tuple(entry["inputs"])
            self.features = tuple(entry["features"])
            self.center = np.asarray(entry["center"], dtype=np.float64)
            self.scale = np.asarray(entry["scale"], dtype=np.float64)
            classifier, regression = entry["classifier"], entry["regression"]
            self.kind = str(classifier["kind"])
            self.temperature = float(classifier.get("temperature", 1.0))
            self.reg_coef = np.asarray(regression["coef"], dtype=np.float64)
            self.reg_intercept = float(regression["intercept"])
            self.residual_sd = float(regression["residual_sd"])
            q_low, q_high = regression["residual_quantiles"]
            self.q_low, self.q_high = float(q_low), float(q_high)
            if self.kind == "multinomial":
                self.coef = np.asarray(classifier["coef"], dtype=np.float64)
                self.intercept = np.asarray(classifier["intercept"], dtype=np.float64)
            elif self.kind == "ordinal_t":
                self.sigma = float(classifier.get("sigma", self.residual_sd))
            else:
                raise ValueError(f"unknown classifier kind {self.kind!r}")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed fusion head: {exc!r}") from exc
        n = len(self.features)
        shapes_ok = self.center.shape == (n,) and self.scale.shape == (n,) and self.reg_coef.shape == (n,)
        if self.kind == "multinomial":
            shapes_ok = shapes_ok and self.coef.shape == (len(CLASSES), n) and self.intercept.shape == (len(CLASSES),)
        if not shapes_ok or not np.all(self.scale > 0) or self.temperature <= 0:
            raise ValueError(f"fusion head for {list(self.inputs)}: parameter shapes do not match its features")
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ValueError(f"fusion head uses unknown features {unknown}")

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(raw) - self.center) / self.scale

    def predict_raw(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, F] raw features -> ([N, 3] probabilities, [N] T-score estimates)."""
        z = self.standardise(raw)
        mu = z @ self.reg_coef + self.reg_intercept
        if self.kind == "multinomial":
            probs = _softmax((z @ self.coef.T + self.intercept) / self.temperature)
        else:
            probs = probabilities_from_t(mu, self.sigma)
        return probs, mu

    def predict(self, x: FusionInputs) -> FusionResult:
        probs, mu = self.predict_raw(feature_vector(x, self.features)[None])
        t = float(mu[0])
        return FusionResult(
            probabilities={name: float(p) for name, p in zip(CLASSES, probs[0], strict=True)},
            t_score=round(t, 2),
            t_score_interval=(round(t + self.q_low, 2), round(t + self.q_high, 2)),
        )
