"""What the lab's scripts import: command lines (cli), output files (files),
MNIST (mnist), the machine (machine), ROC curves (roc) and figures (plots, vae_figures)."""
