"""Whether a report addresses the heart, the lungs and the pleura, as a radiologist's does.

A chest radiograph report describes each of the three, normal or not ("The heart is normal
in size. The lungs are clear. No pleural effusion or pneumothorax."): 82 % of the test
split's real reports address all three. The words that count, per part:

* heart: heart, cardiac, cardiomegaly, cardiomediastinal, mediastinum/mediastinal;
* lungs: lung(s), pulmonary, airspace, parenchyma, lobe(s);
* pleura: pleura/pleural, effusion(s), pneumothorax, costophrenic.
"""

from __future__ import annotations

import re

ANATOMY = {
    "heart": re.compile(
        r"\b(?:heart|cardiac|cardiomegaly|cardiomediastinal|mediastin\w*)\b", re.IGNORECASE
    ),
    "lungs": re.compile(r"\b(?:lungs?|pulmonary|airspace|parenchym\w*|lobes?)\b", re.IGNORECASE),
    "pleura": re.compile(
        r"\b(?:pleura\w*|effusions?|pneumothora\w*|costophrenic)\b", re.IGNORECASE
    ),
}


def unaddressed(text: str) -> list[str]:
    """The parts of ``ANATOMY`` that ``text`` does not mention, in order."""
    return [part for part, pattern in ANATOMY.items() if not pattern.search(text)]
