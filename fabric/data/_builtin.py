"""Public tabular datasets that ``builtin:<name>`` names; read from installed packages, never downloaded.

``builtin:fair`` (the default) — Fair's extramarital-affairs survey data, as shipped in statsmodels
(``statsmodels.datasets.fair``): 6,366 married women interviewed by *Redbook* magazine in 1974.
Binary classification: ``target`` is 1 when the respondent reported any time spent in
extramarital affairs (32% of rows), from 8 features: ``rate_marriage`` (1-5), ``age``,
``yrs_married``, ``children``, ``religious`` (1-4), ``educ`` (years), and two categorical ones,
``occupation`` and ``occupation_husb`` (6 occupation groups, given names here instead of the
survey's codes 1-6).
Source: R. C. Fair, "A Theory of Extramarital Affairs", *Journal of Political Economy* 86(1),
1978, pp. 45-61; data at http://fairmodel.econ.yale.edu/rayfair/pdf/2011b.htm. Licence: statsmodels
(BSD-3-Clause) distributes it "with permission of the author"; fabric reads it from the installed
statsmodels package and does not redistribute it.

``builtin:breast_cancer`` — the Wisconsin Diagnostic Breast Cancer data as shipped in scikit-learn
(``sklearn.datasets.load_breast_cancer``): 569 rows, 30 numeric features, ``target`` 0 = malignant,
1 = benign. Source: W. N. Street, W. H. Wolberg, O. L. Mangasarian, UCI Machine Learning
Repository (https://doi.org/10.24432/C5DW2B). Licence: CC BY 4.0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from fabric.errors import ConfigError, ConfigProblem, require

# Occupation groups of the survey (codes 1-6 in the original data).
_OCCUPATIONS = {
    1: "student",
    2: "farming_semiskilled_unskilled",
    3: "white_collar",
    4: "teacher_nurse_artist_skilled",
    5: "managerial_business",
    6: "professional_advanced_degree",
}


@dataclass(frozen=True)
class Builtin:
    """A dataset fabric knows how to load, with what a user needs to cite it."""

    name: str
    load: Callable[[], pd.DataFrame]
    description: str
    source: str
    licence: str


def _fair() -> pd.DataFrame:
    fair = require("statsmodels.datasets.fair", "data")
    raw = fair.load_pandas().data
    df = pd.DataFrame(
        {
            "rate_marriage": raw["rate_marriage"].astype("int64"),
            "age": raw["age"].astype("float64"),
            "yrs_married": raw["yrs_married"].astype("float64"),
            "children": raw["children"].astype("float64"),
            "religious": raw["religious"].astype("int64"),
            "educ": raw["educ"].astype("int64"),
            "occupation": raw["occupation"].astype("int64").map(_OCCUPATIONS).astype(object),
            "occupation_husb": raw["occupation_husb"].astype("int64").map(_OCCUPATIONS).astype(object),
            "target": (raw["affairs"] > 0).astype("int64"),
        }
    )
    return df


def _breast_cancer() -> pd.DataFrame:
    datasets = require("sklearn.datasets", "data")
    return datasets.load_breast_cancer(as_frame=True).frame.astype({"target": "int64"})


def _wine() -> pd.DataFrame:
    datasets = require("sklearn.datasets", "data")
    return datasets.load_wine(as_frame=True).frame.astype({"target": "int64"})


def _diabetes() -> pd.DataFrame:
    datasets = require("sklearn.datasets", "data")
    return datasets.load_diabetes(as_frame=True, scaled=False).frame.astype({"target": "float64"})


BUILTINS: dict[str, Builtin] = {
    "fair": Builtin(
        "fair",
        _fair,
        "6,366 survey respondents, 8 features (2 categorical), binary target: any extramarital affair",
        "R. C. Fair (1978), J. Political Economy 86(1):45-61, via statsmodels.datasets.fair",
        "distributed by statsmodels (BSD-3-Clause) with permission of the author",
    ),
    "breast_cancer": Builtin(
        "breast_cancer",
        _breast_cancer,
        "569 tumours, 30 numeric features, binary target: benign",
        "Wisconsin Diagnostic Breast Cancer, UCI ML Repository, via sklearn.datasets",
        "CC BY 4.0",
    ),
    "wine": Builtin(
        "wine",
        _wine,
        "178 wines, 13 numeric features, 3-class target: cultivar",
        "Wine recognition, UCI ML Repository (Forina et al.), via sklearn.datasets",
        "CC BY 4.0",
    ),
    "diabetes": Builtin(
        "diabetes",
        _diabetes,
        "442 patients, 10 numeric features, regression target: disease progression after one year",
        "B. Efron et al. (2004), Annals of Statistics 32(2):407-499, via sklearn.datasets",
        "distributed by scikit-learn (BSD-3-Clause)",
    ),
}


def load_builtin(name: str) -> pd.DataFrame:
    """The named builtin dataset as a pandas DataFrame (its label column is ``target``)."""
    if name not in BUILTINS:
        raise ConfigError(
            [ConfigProblem("data.source", f"unknown builtin dataset {name!r}; known: {', '.join(sorted(BUILTINS))}")]
        )
    return BUILTINS[name].load()
