"""Python tools that read parabench result files (docs/SPEC.md section 6): `report` (tables and plots
across runs and clusters), `results` (reading files into records), `summarize.py`, `memory_experiments`
and `timeline`. Run them from the repository root, e.g. `python3 -m analysis.report RESULTS --out DIR`."""
