"""What the lab's scripts import: command lines (cli), output files (files), MNIST (mnist), features
(features), the machine (machine), ROC curves (roc) and figures (plots, logreg_figures, vae_figures)."""
