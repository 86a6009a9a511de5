"""Grids: a grid file expanded into cells (``expansion``), checked before anything is queued (``checks``), and
dispatched as jobs, locally or to SLURM (``dispatch``)."""
