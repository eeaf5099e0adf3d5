"""The report grammar: MIMIC-style free-text reports and the CheXpert labels they assert.

Every sentence travels with the labels it asserts (1.0 positive, -1.0 uncertain, 0.0
negative), so a report's labels are exactly what its kept sections say.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import numpy as np

from .labels import CHEXPERT_COLUMNS, FINDING_COLUMN, FINDINGS, own_label
from .sampling import pick

Sentence = tuple[str, dict[str, float]]     # text, labels it asserts

_SEV_ADV = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_LOBES = {("right", "upper"): "right upper lobe", ("right", "mid"): "right middle lobe",
          ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
          ("left", "mid"): "lingula", ("left", "lower"): "left lower lobe"}
_NEG_NAMES = {"pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
              "consolidation": "focal consolidation", "edema": "pulmonary edema",
              "atelectasis": "atelectasis"}
# How often a report denies each finding the study does not have.
_P_NEGATED = {"pleural_effusion": 0.7, "pneumothorax": 0.7, "consolidation": 0.55,
              "edema": 0.35, "atelectasis": 0.08}
_P_HEART_NORMAL = 0.6
_HEART_NORMAL = ("The heart size is normal.", "Heart size is normal.", "Normal cardiac silhouette.",
                 "The cardiomediastinal silhouette is within normal limits.")
_INDICATIONS = (
    "shortness of breath", "chest pain", "fever and cough", "hypoxia", "dyspnea on exertion",
    "leukocytosis", "weakness", "preoperative evaluation", "tachycardia", "s/p fall",
    "altered mental status", "productive cough",
)
_NO_HEART = {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0}
_NORMAL_FINDINGS: tuple[Sentence, ...] = (
    ("The lungs are clear. The cardiomediastinal silhouette is within normal limits.",
     _NO_HEART),
    ("The lungs are well expanded and clear. Heart size and mediastinal contours are normal.",
     _NO_HEART),
    ("Lungs are clear bilaterally. The heart size is normal. Hilar contours are unremarkable.",
     {"Cardiomegaly": 0.0}),
    ("The lungs are clear without focal consolidation. Cardiac and mediastinal silhouettes "
     "are unremarkable.", {**_NO_HEART, "Consolidation": 0.0}),
)
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.", "No acute intrathoracic process.",
    "Normal chest radiograph.", "No acute cardiopulmonary abnormality.",
)
_FILLERS = (
    "Imaged osseous structures are intact.", "No free air below the right hemidiaphragm.",
    "Mild degenerative changes of the thoracic spine.", "The bony thorax is unremarkable.",
)
_DEVICE_TEXT = {
    "line": ("A central venous catheter terminates in the mid SVC.",
             "Right internal jugular line tip projects over the cavoatrial junction."),
    "tube": ("Endotracheal tube tip terminates 4 cm above the carina.",
             "The endotracheal tube is in standard position."),
    "ecg": ("ECG leads overlie the chest.", "Monitoring leads are noted."),
}


# --- how each finding is mentioned: (findings sentence, impression phrase, labels the sentence
# asserts besides the finding's own)

Phrases = tuple[str, str, dict[str, float]]


def _cardiomegaly(a: dict, rng: np.random.Generator) -> Phrases:
    sev = a.get("severity", "moderate")
    adv = _SEV_ADV[sev]
    if a.get("uncertain"):
        return (pick(rng, ("The heart is possibly mildly enlarged.",
                           "Borderline heart size, possibly mild cardiomegaly.")),
                "Possible mild cardiomegaly.", {})
    return (pick(rng, (f"The heart is {adv} enlarged.", f"There is {sev} cardiomegaly.",
                       f"The cardiac silhouette is {adv} enlarged.",
                       f"{adv.capitalize()} enlarged cardiac silhouette.")),
            pick(rng, (f"{sev.capitalize()} cardiomegaly.", "Cardiomegaly.",
                       f"{adv.capitalize()} enlarged heart.")), {})


def _pleural_effusion(a: dict, rng: np.random.Generator) -> Phrases:
    side = a.get("side", "right")
    bilateral = side == "bilateral"
    if a.get("uncertain"):
        return (pick(rng, (f"Possible small {side} pleural effusion.",
                           "Possible small bilateral pleural effusions." if bilateral else
                           f"Blunting of the {side} costophrenic angle may represent a small "
                           "effusion.")),
                f"Possible small {side} pleural effusion.", {})
    sev = a.get("severity", "moderate")
    plural = "effusions" if bilateral else "effusion"
    return (pick(rng, (f"There are {sev} bilateral pleural effusions." if bilateral else
                       f"There is a {sev} {side} pleural {plural}.",
                       f"{sev.capitalize()} {side} pleural {plural} with associated "
                       "basilar opacity.",
                       f"Layering {side} pleural fluid with a meniscus, compatible with "
                       f"{'' if bilateral else 'a '}{sev} {plural}.")),
            pick(rng, (f"{sev.capitalize()} {side} pleural {plural}.",
                       f"{sev.capitalize()} {side} {plural}.")), {})


def _pneumothorax(a: dict, rng: np.random.Generator) -> Phrases:
    side = a.get("side", "right")
    if a.get("uncertain"):
        return (f"Possible tiny {side} apical pneumothorax.",
                f"Possible tiny {side} pneumothorax.", {})
    sev = a.get("severity", "small")
    return (pick(rng, (f"There is a {sev} {side} pneumothorax.",
                       f"{sev.capitalize()} {side} apical pneumothorax with a visible pleural "
                       "line.",
                       f"A {side} pleural line is seen with absent lung markings laterally, "
                       f"consistent with a {sev} pneumothorax.",
                       f"{sev.capitalize()} {side} apicolateral pleural air collection beyond a "
                       "visible pleural line.")),
            pick(rng, (f"{sev.capitalize()} {side} pneumothorax.",
                       f"{sev.capitalize()} amount of {side} pleural air.")), {})


def _consolidation(a: dict, rng: np.random.Generator) -> Phrases:
    side, zone = a.get("side", "right"), a.get("zone", "lower")
    lobe = _LOBES[(side, zone)]
    if a.get("uncertain"):
        return (f"Subtle opacity in the {lobe} may represent early consolidation.",
                f"Possible early consolidation in the {lobe}.", {"Lung Opacity": 1.0})
    bronch = " with air bronchograms" if a.get("air_bronchograms") else ""
    sentence = pick(rng, (f"There is dense consolidation in the {lobe}{bronch}.",
                          f"Focal consolidation is seen in the {side} {zone} lung zone{bronch}.",
                          f"Patchy airspace opacity in the {lobe}{bronch}, compatible with "
                          "consolidation.",
                          f"Airspace consolidation in the {lobe}{bronch}, concerning for pneumonia.",
                          f"Dense airspace opacification of the {lobe}{bronch}."))
    also: dict[str, float] = {}
    if "opaci" in sentence:
        also["Lung Opacity"] = 1.0
    if "pneumonia" in sentence:
        also["Pneumonia"] = -1.0
    return sentence, pick(rng, (f"{lobe.capitalize()} consolidation.",
                                f"Consolidation in the {lobe}.")), also


def _edema(a: dict, rng: np.random.Generator) -> Phrases:
    if a.get("uncertain"):
        return "Possible mild interstitial edema.", "Possible mild pulmonary edema.", {}
    sev = a.get("severity", "moderate")
    return (pick(rng, (f"There is {sev} pulmonary edema.",
                       f"{sev.capitalize()} pulmonary vascular congestion with perihilar "
                       "haziness.",
                       f"Perihilar haziness and Kerley B lines, consistent with {sev} "
                       "interstitial edema.",
                       f"Diffuse bilateral perihilar opacities in a bat-wing distribution, "
                       f"compatible with {sev} alveolar edema.")),
            pick(rng, (f"{sev.capitalize()} pulmonary edema.",
                       f"{sev.capitalize()} pulmonary vascular congestion.",
                       f"Findings consistent with {sev} fluid overload.")), {})


def _atelectasis(a: dict, rng: np.random.Generator) -> Phrases:
    side = a.get("side", "right")
    bilateral = side == "bilateral"
    where = "bibasilar" if bilateral else f"{side} basilar"
    if a.get("uncertain"):
        return (f"Minimal {where} opacity, possibly atelectasis.",
                f"Possible {where} atelectasis.", {"Lung Opacity": 1.0})
    base = "bases" if bilateral else f"{side} base"
    hemi = "hemidiaphragms" if bilateral else f"{side} hemidiaphragm"
    sentence = pick(rng, (f"Plate-like atelectasis at the {base}.",
                          f"Linear {where} opacity consistent with atelectasis.",
                          f"{where.capitalize()} volume loss with elevation of the {hemi}, "
                          "consistent with collapse.",
                          f"There is {where} subsegmental atelectasis."))
    also = {"Lung Opacity": 1.0} if "opacity" in sentence else {}
    return sentence, pick(rng, (f"{where.capitalize()} atelectasis.",
                                f"{where.capitalize()} collapse.")), also


_PHRASES: dict[str, Callable[[dict, np.random.Generator], Phrases]] = {
    "cardiomegaly": _cardiomegaly, "pleural_effusion": _pleural_effusion,
    "pneumothorax": _pneumothorax, "consolidation": _consolidation, "edema": _edema,
    "atelectasis": _atelectasis,
}


def _mention(name: str, attrs: dict, rng: np.random.Generator) -> tuple[str, str, dict[str, float]]:
    """A findings sentence, an impression phrase and the labels the sentence asserts.

    The impression phrase asserts only the finding's own label.
    """
    sentence, impression, also = _PHRASES[name](attrs, rng)
    return sentence, impression, {**own_label(name, attrs), **also}


# --- the report around the mentions

def _or_list(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"{names[0]} or {names[1]}"
    return ", ".join(names[:-1]) + f", or {names[-1]}"


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _join_phrases(phrases: list[str]) -> str:
    """One sentence from several: "A.", "B.", "C." give "A, b and c."."""
    first, rest = phrases[0].rstrip("."), [_lower_first(p.rstrip(".")) for p in phrases[1:]]
    return first + "".join(f", {r}" for r in rest[:-1]) + f" and {rest[-1]}."


def _negations(findings: dict[str, dict], rng: np.random.Generator) -> list[Sentence]:
    """Sentences denying some of the findings the study does not have."""
    negations: list[Sentence] = []
    if "cardiomegaly" not in findings and rng.random() < _P_HEART_NORMAL:
        negations.append((pick(rng, _HEART_NORMAL), dict(_NO_HEART)))
    negated = [f for f in _P_NEGATED if f not in findings and rng.random() < _P_NEGATED[f]]
    if negated:
        negations.append((f"No {_or_list([_NEG_NAMES[f] for f in negated])}.",
                          {FINDING_COLUMN[f]: 0.0 for f in negated}))
    return negations


def _header(view: str, rng: np.random.Generator) -> list[str]:
    """Examination, indication (or history), comparison and sometimes technique lines."""
    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    sex = "woman" if rng.random() < 0.5 else "man"
    if rng.random() < 0.7:
        indication = f" INDICATION:  ___ year old {sex} with {pick(rng, _INDICATIONS)}."
    else:
        indication = f" HISTORY:  ___{sex[0].upper()} with {pick(rng, _INDICATIONS)}."
    lines = [f" EXAMINATION:  {exam}", indication,
             " COMPARISON:  " + pick(rng, ("None.", "___.", "Chest radiograph from ___."))]
    if rng.random() < 0.2:
        lines[0], lines[1] = lines[1], lines[0]
    if rng.random() < 0.3:
        lines.insert(2, " TECHNIQUE:  " + ("PA and lateral views of the chest."
                                           if view == "PA" else "Portable AP chest radiograph."))
    return lines


def _merge(into: dict[str, float], labels: dict[str, float]) -> None:
    # CheXpert precedence: a positive mention wins over uncertain, uncertain over negative.
    rank = {1.0: 2, -1.0: 1, 0.0: 0}
    for k, v in labels.items():
        if k not in into or rank[v] > rank[into[k]]:
            into[k] = v


def _assemble(body: list[Sentence], impression: list[Sentence], view: str,
              rng: np.random.Generator) -> tuple[str, dict[str, float]]:
    """The report text from its findings and impression sentences, and the labels of the
    sections it keeps."""
    # Occasionally drop one section (never both), as real reports do.
    r = rng.random()
    keep_findings, keep_impression = r >= 0.08, not (0.08 <= r < 0.13)
    sections = _header(view, rng)
    wrap = textwrap.TextWrapper(width=78, initial_indent=" ", subsequent_indent=" ")
    kept: list[Sentence] = []
    if keep_findings and keep_impression and rng.random() < 0.03:
        kept = body + impression
        sections.append(" FINDINGS AND IMPRESSION:\n\n" + wrap.fill(" ".join(s for s, _ in kept)))
    else:
        if keep_findings:
            title = " Findings:" if rng.random() < 0.1 else " FINDINGS:"
            sections.append(title + "\n\n" + wrap.fill(" ".join(s for s, _ in body)))
            kept += body
        if keep_impression:
            title = " CONCLUSION:" if rng.random() < 0.08 else " IMPRESSION:"
            sections.append(title + "\n\n" + wrap.fill(" ".join(s for s, _ in impression)))
            kept += impression
    labels: dict[str, float] = {}
    for _, sentence_labels in kept:
        _merge(labels, sentence_labels)
    if not any(labels.get(c) in (1.0, -1.0) for c in CHEXPERT_COLUMNS if c != "Support Devices"):
        labels["No Finding"] = 1.0
    text = " " * 33 + "FINAL REPORT\n" + "\n\n".join(sections) + "\n"
    return text, labels


def write_report(findings: dict[str, dict], rng: np.random.Generator, *,
                 view: str = "PA") -> tuple[str, dict[str, float]]:
    """Write a MIMIC-style report for ``findings``; returns (text, CheXpert labels).

    Labels only hold the columns the text mentions (1.0 / 0.0 / -1.0); unmentioned columns
    are absent, i.e. blank in the CSV.
    """
    present = [f for f in FINDINGS if f in findings]
    mentions: list[Sentence] = []
    impression: list[Sentence] = []
    for i in rng.permutation(len(present)):
        name = present[i]
        sentence, phrase, labels = _mention(name, findings[name], rng)
        mentions.append((sentence, labels))
        impression.append((phrase, own_label(name, findings[name])))
    negations = _negations(findings, rng)
    devices = findings.get("support_devices")
    device_sentences = [(pick(rng, _DEVICE_TEXT[k]), {"Support Devices": 1.0})
                        for k in (devices or {}).get("kinds", [])]

    if present:
        body = mentions + device_sentences + negations
        if rng.random() < 0.3:
            body.append((pick(rng, _FILLERS), {}))
        if device_sentences and rng.random() < 0.4:
            impression.append(("Support devices as described.", {"Support Devices": 1.0}))
        if len(impression) > 1 and rng.random() < 0.5:
            impression = [(_join_phrases([s for s, _ in impression]),
                           {k: v for _, lab in impression for k, v in lab.items()})]
    else:
        body = [pick(rng, _NORMAL_FINDINGS), *device_sentences]
        body += [n for n in negations if "Cardiomegaly" not in n[1]]
        if rng.random() < 0.4:
            body.append((pick(rng, _FILLERS), {}))
        impression = [(pick(rng, _NORMAL_IMPRESSIONS), {})]
    return _assemble(body, impression, view, rng)
