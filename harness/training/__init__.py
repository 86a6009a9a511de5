"""Training a student: the loop (``loop``), its loss (``objective``), exact accumulation, masking, the optimiser,
checkpoints, zero-shot progress, why a run stops (``stops``) and the trackers it reports to."""
