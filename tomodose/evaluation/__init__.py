"""Plan evaluation: DVHs (:mod:`~tomodose.evaluation.dvh`), metrics
(:mod:`~tomodose.evaluation.metrics`), protocols (:mod:`~tomodose.evaluation.protocol`),
radiobiology (:mod:`~tomodose.evaluation.radiobiology`) and gamma analysis
(:mod:`~tomodose.evaluation.gamma`). Import the submodules directly; this package file stays
light so that importing one does not import the others."""
