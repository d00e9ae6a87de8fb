"""Objective: losses (bigltr.objective.losses), the MaxNorm constraint (.maxnorm), post-hoc normalisation (.posthoc)."""
