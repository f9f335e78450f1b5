"""Sinogram optimisation (inverse planning) on the pencil-beam influence matrix."""

from tomodose.optimisation.sinogram import (
    OptimisationSettings, build_terms, make_deliverable, normalisation_scale, optimise_plan, optimise_sinogram,
)

__all__ = ["OptimisationSettings", "build_terms", "optimise_sinogram", "make_deliverable", "optimise_plan",
           "normalisation_scale"]
