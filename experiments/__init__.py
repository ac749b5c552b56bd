"""The assignment's experiments and the report: python -m experiments.sweep_logreg, experiments.sweep_vae,
experiments.report (make sweep-logreg, sweep-vae, report)."""
