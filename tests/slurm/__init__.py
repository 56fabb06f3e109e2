"""Test harness for slurm/: a real local SLURM cluster (cluster.py)."""
