"""The codes of the OsteoGate result SR (standard where DICOM, SNOMED CT, LOINC or UCUM have one).

Why "Probability + Associated finding" rather than one concept name per class: DICOM has no
standard per-class probability codes for bone density, and a private scheme would be opaque to PACS
viewers. Why a private code for the T-score: PS3.16 has no T-score concept, and the LOINC T-score
codes name a DXA measurement at a site, which this estimate from a header (and radiograph) is not.
The WHO category of the estimate and the referral decision use private values for what SNOMED CT
has no concept of ("above the osteopenia range", "below the referral threshold"); the scheme is
declared in CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

from osteogate.model.estimand import BELOW_THRESHOLD, REFERRAL
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99OSTEOGATE"

PROBABILITY = codes.DCM.Probability  # DCM 122157 "Probability"
PERCENT = Code("%", "UCUM", "%")
ASSOCIATED_FINDING = Code("246090004", "SCT", "Associated finding")
OSTEOPOROSIS = Code("64859006", "SCT", "Osteoporosis")
OSTEOPENIA = Code("312894000", "SCT", "Osteopenia")
NORMAL = Code("17621005", "SCT", "Normal")
CLASS_CODES: dict[str, Code] = {"normal": NORMAL, "osteopenia": OSTEOPENIA, "osteoporosis": OSTEOPOROSIS}
# The WHO category of the estimate (a CODE item consistent with the T-score NUM). The normal range
# is coded by what it is not: a screen does not call bone density normal.
T_SCORE_CATEGORY = Code("T-SCORE-CAT", PRIVATE_SCHEME, "WHO category of the estimated T-score")
CATEGORY_CODES: dict[str, Code] = {
    "normal": Code("ABOVE-OSTEOPENIA", PRIVATE_SCHEME, "Above the osteopenia range (T-score -1.0 or above)"),
    "osteopenia": Code("OSTEOPENIA-RANGE", PRIVATE_SCHEME, "Osteopenia range (T-score below -1.0, above -2.5)"),
    "osteoporosis": Code("OSTEOPOROSIS-RANGE", PRIVATE_SCHEME, "Osteoporosis range (T-score -2.5 or below)"),
}
# The screening decision, its own coded item: a recommendation, not a finding.
RECOMMENDATION = codes.DCM.RecommendedFollowUp  # DCM 111053 "Recommended Follow-up" (CAD SR, CID 6028 values)
DECISION_CODES: dict[str, Code] = {
    REFERRAL: Code("DXA-REFERRAL", PRIVATE_SCHEME, "DXA referral suggested"),
    BELOW_THRESHOLD: Code("BELOW-REFERRAL-THRESHOLD", PRIVATE_SCHEME, "Below the referral threshold"),
}
COMMENT = codes.DCM.Comment  # DCM 121106
SUMMARY = codes.DCM.Summary  # DCM 121111, a CID 7001 report heading
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
RADIOGRAPHY_PROCEDURE = Code("363680008", "SCT", "Radiographic imaging procedure")
KNEE = Code("72696002", "SCT", "Knee")
SPINE = Code("421060004", "SCT", "Spine")
# BodyPartExamined defined terms (PS3.16 Annex L) that name a spine segment: reporting the
# segment when the modality said so is more precise than the generic "Spine".
SPINE_SEGMENTS: dict[str, Code] = {
    "CSPINE": Code("122494005", "SCT", "Cervical spine"),
    "TSPINE": Code("122495006", "SCT", "Thoracic spine"),
    "LSPINE": Code("122496007", "SCT", "Lumbar spine"),
}
LATERALITY: dict[str, Code] = {
    "R": Code("24028007", "SCT", "Right"),
    "L": Code("7771000", "SCT", "Left"),
    "B": Code("51440002", "SCT", "Right and left"),
}
# Inputs: standard concepts and UCUM units.
SUBJECT_AGE = codes.DCM.SubjectAge  # DCM 121033, CID 7456 units
SUBJECT_SEX = codes.DCM.SubjectSex  # DCM 121032, CID 7455 values
SEX_CODES: dict[str, Code] = {"F": codes.DCM.Female, "M": codes.DCM.Male}
BODY_WEIGHT = Code("29463-7", "LN", "Body weight")
BODY_HEIGHT = Code("8302-2", "LN", "Body height")
YEARS = Code("a", "UCUM", "year")
KILOGRAMS = Code("kg", "UCUM", "kg")
METRES = Code("m", "UCUM", "m")
T_SCORE = Code("T-SCORE-EST", PRIVATE_SCHEME, "Estimated T-score")
T_SCORE_UNIT = Code("{T-score}", "UCUM", "T-score")

STUDY_TRACKING_ID = "study result"
NOT_ASSESSED_PREFIX = "Not assessed: "
SKIPPED_PREFIX = "Image not classified: "
