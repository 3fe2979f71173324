"""scripts/reproduce.py's parts: a YAML plan expanded into the stage graph (plan.py), each stage's state on disk
(state.py), running it here (local.py) or as SLURM job arrays (slurm.py), the compute estimate (estimate.py) and
the tables and plots of the finished cells (collect.py)."""
