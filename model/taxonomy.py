"""The one source of truth for class, region and input names (serving, training, SQL, SR, card).

A checkpoint's card names its classes and regions; ``check_card_taxonomy`` refuses a card whose
names differ from these at load time, so a mismatching checkpoint fails at start with a clear
message rather than in every job.
"""

from __future__ import annotations

from collections.abc import Sequence

CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
# Low bone mineral density = osteopenia or osteoporosis (T-score below -1.0).
LOW_BMD_CLASSES: tuple[str, ...] = ("osteopenia", "osteoporosis")
REGIONS: tuple[str, ...] = ("knee", "spine")
# Everything a result can be based on: the image and the header covariates (model/covariates.py).
COVARIATES: tuple[str, ...] = ("age", "sex", "weight", "height")
INPUTS: tuple[str, ...] = ("image", *COVARIATES)

# WHO densitometry cut-offs that define the classes from a T-score.
T_SCORE_OSTEOPENIA = -1.0
T_SCORE_OSTEOPOROSIS = -2.5


def class_from_t_score(t_score: float) -> str:
    """WHO class of a densitometry T-score (<= -2.5 osteoporosis, < -1.0 osteopenia).

    Parameters
    ----------
    t_score : float
        A T-score.

    Returns
    -------
    str
        One of CLASSES.
    """
    if t_score <= T_SCORE_OSTEOPOROSIS:
        return "osteoporosis"
    if t_score < T_SCORE_OSTEOPENIA:
        return "osteopenia"
    return "normal"


class TaxonomyError(ValueError):
    """A checkpoint whose classes or regions are not the ones this gateway reports."""


def check_card_taxonomy(classes: Sequence[str], regions: Sequence[str], what: str = "model card") -> None:
    """Refuse a card whose classes or regions differ from this gateway's.

    Parameters
    ----------
    classes : Sequence[str]
        The card's classes.
    regions : Sequence[str]
        The card's regions.
    what : str
        The card's name in the error.

    Raises
    ------
    TaxonomyError
        On other classes or unknown regions.
    """
    if tuple(classes) != CLASSES:
        raise TaxonomyError(f"{what} has classes {list(classes)}; this gateway reports exactly {list(CLASSES)}")
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise TaxonomyError(f"{what} has regions {unknown} this gateway does not know (known: {list(REGIONS)})")
