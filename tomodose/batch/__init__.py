"""Batch research studies on Dask: many plans, phantoms and perturbations (see ``docs/batch.md``).

* :class:`Study` / :func:`load_study` - a table of cases (patient, plan, delivery perturbation)
  with shared settings, read from a study TOML; cases are identified by the hash of their content;
* :class:`Perturbation` / :func:`apply_perturbation` - TG-148 delivery errors (couch speed, leaf
  latency, jaw width, set-up shift, gantry period) applied to the delivered projection sequence;
* :func:`run_study` - runs the cases on a Dask cluster (LocalCluster by default), one HDF5 file per
  case and a summary table; resumable, retries, failures reported;
* :func:`run_cases_serially` - the same cases one by one in this process (reference).

Needs the ``batch`` extra (``dask[distributed]``, ``pandas``) for :func:`run_study`.
"""

from tomodose.batch.perturbation import PERTURBATION_FIELDS, Perturbation, apply_perturbation
from tomodose.batch.runner import StudyResult, clean_temporaries, local_cluster, run_cases_serially, run_study
from tomodose.batch.study import (
    BATCH_FORMAT_VERSION,
    NORMALISATIONS,
    Case,
    ClusterSettings,
    PhantomSpec,
    PlanSpec,
    Study,
    StudySettings,
    load_study,
    study_from_dict,
)
from tomodose.batch.task import prepare_group, run_case

__all__ = [
    "Perturbation",
    "apply_perturbation",
    "PERTURBATION_FIELDS",
    "Case",
    "PhantomSpec",
    "PlanSpec",
    "StudySettings",
    "ClusterSettings",
    "Study",
    "load_study",
    "study_from_dict",
    "BATCH_FORMAT_VERSION",
    "NORMALISATIONS",
    "run_study",
    "run_cases_serially",
    "StudyResult",
    "local_cluster",
    "clean_temporaries",
    "prepare_group",
    "run_case",
]
