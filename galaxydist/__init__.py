"""galaxydist: distributed training of a galaxy-morphology CNN, from a laptop to a SLURM cluster."""

__version__ = "0.1.0"
