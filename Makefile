# MNIST deep-learning lab: ResNet-50 features -> logistic regression + ROC, and a VAE.
# `make help` lists the targets; every variable below can be set on the command line.

PYTHON   ?= .venv/bin/python## interpreter (default: the project's own venv, built on demand)
DATA     ?= data## torchvision MNIST root (downloaded there if missing)
OUT      ?= artifacts## where .mat files, checkpoints and metrics go
FIGURES  ?= figures## where the PNG figures go
WEIGHTS  ?= IMAGENET1K_V1## ResNet-50 weights: IMAGENET1K_V1, IMAGENET1K_V2, none (random init) or a .pth path
LIMIT    ?=## use only the first N images of each split (empty = all)
DEVICE   ?= auto## auto, cpu, cuda or mps
DTYPE    ?= float32## features in float32, or bfloat16 (opt-in: faster only with bf16 units)
THREADS  ?=## CPU threads of extraction and VAE training (empty = torch's default; 1 helps on a busy shared VM)
REPORT   ?= REPORT.md## where make report writes the one-page results report

override VENV := .venv# not a setting: distclean removes it
HELP_VARS := PYTHON DATA OUT FIGURES WEIGHTS LIMIT DEVICE DTYPE THREADS REPORT BOOTSTRAP
BOOTSTRAP ?= python3## the Python that creates .venv
# Paths go into rule targets, so they are checked before any rule is read.
check_path   = $(if $(filter-out 1,$(words $($(1)))),$(error $(1)='$($(1))' must be one path, without spaces))
$(foreach v,DATA OUT FIGURES REPORT,$(call check_path,$(v)))
REQS      := requirements.txt requirements-dev.txt
LAB       := $(wildcard lab/*.py)# the support package every script imports
# Scripts depend on the venv only when it is the interpreter in use.
SETUP     := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/.installed)
LIMIT_ARG := $(if $(strip $(LIMIT)),--limit $(strip $(LIMIT)))
THREADS_ARG := $(if $(strip $(THREADS)),--threads $(strip $(THREADS)))

FEATURES_MAT := $(OUT)/mnist_train.mat $(OUT)/mnist_test.mat
LOGREG_FIGS  := $(addprefix $(FIGURES)/,logreg_test_accuracy.png roc.png confusion_matrix.png)
VAE_FIGS     := $(addprefix $(FIGURES)/,vae_loss.png vae_reconstructions.png vae_samples.png vae_latent.png vae_interpolation.png)

.DEFAULT_GOAL := help
.PHONY: help setup all features logreg vae figures report sweep test bench clean distclean FORCE


help: ## show this help
	@echo "Usage: make TARGET [VAR=value ...]"
	@echo
	@echo "Targets:"
	@grep -hE '^[a-zA-Z_$$()/.-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:[^#]*## /\t/' | awk -F'\t' '{printf "  %-22s %s\n", $$1, $$2}'
	@echo
	@echo "Variables (current value):"
	@$(foreach v,$(HELP_VARS),printf "  %-13s %-22s %s\n" "$(v)" "$(or $($(v)),(empty))" "$(shell sed -nE 's/^$(v) +\?=[^#]*## (.*)/\1/p' $(firstword $(MAKEFILE_LIST)))";)

setup: $(SETUP) ## create .venv and install requirements (done automatically by other targets)

$(VENV)/.installed: $(REQS)
	$(BOOTSTRAP) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

all: features logreg vae figures report ## the whole pipeline: features, classifier, VAE, figures, report

# Settings records, so that e.g. `make all WEIGHTS=none` after a pretrained run re-extracts,
# and nothing else does. An output built from settings keeps them beside it, in OUT/.NAME.args,
# written only once its recipe has succeeded; an output whose record differs from the current
# settings is rebuilt (FORCE). A failed run (WEIGHTS=/typo.pth) thus changes no record, and the
# next good run redoes only what it must. Paths are recorded absolute: DATA=data/ is DATA=data.
record   = $(OUT)/.$(notdir $(1)).args
same     = $(and $(findstring |$(1)|,|$(2)|),$(findstring |$(2)|,|$(1)|))
stale    = $(if $(call same,$(strip $(file <$(call record,$(1)))),$(strip $(2))),,FORCE)
save     = @mkdir -p $(OUT) && printf '%s\n' '$(subst ','\'',$(strip $(1)))' > $(call record,$(or $(2),$@)).tmp && mv -f $(call record,$(or $(2),$@)).tmp $(call record,$(or $(2),$@))
WEIGHTS_SETTING  := $(if $(findstring /,$(WEIGHTS))$(filter %.pth,$(WEIGHTS)),$(abspath $(WEIGHTS)),$(WEIGHTS))
FEATURES_SETTINGS = DATA=$(abspath $(DATA)) WEIGHTS=$(WEIGHTS_SETTING) LIMIT=$(LIMIT) DEVICE=$(DEVICE) DTYPE=$(DTYPE)
VAE_SETTINGS      = DATA=$(abspath $(DATA)) LIMIT=$(LIMIT) DEVICE=$(DEVICE)

features: $(FEATURES_MAT) ## ResNet-50 avgpool features of MNIST train and test

# One process per split, so that an interrupted run keeps the split it completed
# and the next `make features` extracts only the other one. Neither split needs
# the other, so `make -j2 features` extracts both at once.
EXTRACT_FEATURES = $(PYTHON) extract_features.py --data-root $(DATA) --out-dir $(OUT) \
  --weights $(WEIGHTS) --device $(DEVICE) --dtype $(DTYPE) $(LIMIT_ARG) $(THREADS_ARG)
FEATURES_DEPS    := extract_features.py $(LAB) $(SETUP)

$(OUT)/mnist_train.mat: $(FEATURES_DEPS) $(call stale,$(OUT)/mnist_train.mat,$(FEATURES_SETTINGS))
	$(EXTRACT_FEATURES) --split train
	$(call save,$(FEATURES_SETTINGS))

$(OUT)/mnist_test.mat: $(FEATURES_DEPS) $(call stale,$(OUT)/mnist_test.mat,$(FEATURES_SETTINGS))
	$(EXTRACT_FEATURES) --split test
	$(call save,$(FEATURES_SETTINGS))

logreg: $(OUT)/logreg.npz $(OUT)/logreg_metrics.json ## logistic regression + ROC on the features (and its figures)

# Both outputs are targets: the report reads the metrics, so a missing one is rebuilt.
$(OUT)/logreg.npz $(OUT)/logreg_metrics.json &: logreg.py $(LAB) $(FEATURES_MAT) $(SETUP)
	$(PYTHON) logreg.py --train-mat $(OUT)/mnist_train.mat --test-mat $(OUT)/mnist_test.mat \
	  --out-dir $(OUT) --figures-dir $(FIGURES)

SWEEP_BATCH  ?= 16 64 256 1024## sweep-logreg: batch sizes of the grid
SWEEP_LR     ?= 1e-4 1e-3 1e-2 1e-1## sweep-logreg: learning rates of the grid
SWEEP_EPOCHS ?= 20## sweep-logreg: epochs per configuration
SWEEP_MODE   ?= reference## sweep-logreg: reference (the assignment's procedure) or default (logreg.py's training)
HELP_VARS    += SWEEP_BATCH SWEEP_LR SWEEP_EPOCHS SWEEP_MODE
.PHONY: sweep-logreg

sweep-logreg: $(OUT)/sweep_logreg.json $(FIGURES)/sweep_logreg.png ## batch size x learning rate grid of the classifier (SWEEP_* variables)

# Its settings record re-runs the sweep when a SWEEP_* variable changes.
SWEEP_LOGREG_SETTINGS = SWEEP_BATCH=$(SWEEP_BATCH) SWEEP_LR=$(SWEEP_LR) SWEEP_EPOCHS=$(SWEEP_EPOCHS) SWEEP_MODE=$(SWEEP_MODE)

$(OUT)/sweep_logreg.json: experiments/sweep_logreg.py logreg.py $(LAB) $(FEATURES_MAT) $(SETUP) \
                          $(call stale,$(OUT)/sweep_logreg.json,$(SWEEP_LOGREG_SETTINGS))
	$(PYTHON) -m experiments.sweep_logreg --train-mat $(OUT)/mnist_train.mat --test-mat $(OUT)/mnist_test.mat \
	  --out-dir $(OUT) --figures-dir $(FIGURES) --batch-sizes $(SWEEP_BATCH) --lrs $(SWEEP_LR) \
	  --epochs $(SWEEP_EPOCHS) --mode $(SWEEP_MODE)
	$(call save,$(SWEEP_LOGREG_SETTINGS))

$(FIGURES)/sweep_logreg.png: $(OUT)/sweep_logreg.json
	$(PYTHON) -m experiments.sweep_logreg --plot-only --out-dir $(OUT) --figures-dir $(FIGURES)

vae: $(OUT)/vae.pt $(OUT)/vae_metrics.json ## train the VAE, 15 epochs (and its figures)

# vae.py writes vae_metrics.json, then vae.pt, then the figures, each atomically:
# a vae.pt is always complete, so an interrupt while the figures are drawn keeps
# it (.PRECIOUS), and the figures' rule below redoes only them. Both files are targets, so
# that a missing vae_metrics.json, which the report reads, is rebuilt; the settings record
# stays vae.pt's, whichever of the two started the rule.
.PRECIOUS: $(OUT)/vae.pt
$(OUT)/vae.pt $(OUT)/vae_metrics.json &: vae.py $(LAB) $(SETUP) $(call stale,$(OUT)/vae.pt,$(VAE_SETTINGS))
	$(PYTHON) vae.py --data-root $(DATA) --out-dir $(OUT) --figures-dir $(FIGURES) \
	  --device $(DEVICE) $(LIMIT_ARG) $(THREADS_ARG)
	$(call save,$(VAE_SETTINGS),$(OUT)/vae.pt)

ZDIMS ?= 2 5 10 20 50## latent sizes that make sweep-vae trains, one VAE each
HELP_VARS += ZDIMS
SWEEP_VAE_FIGS := $(addprefix $(FIGURES)/,sweep_vae_loss.png sweep_vae_reconstructions.png vae_manifold_2d.png vae_latent_2d.png)
.PHONY: sweep-vae

sweep-vae: $(OUT)/sweep_vae.json $(SWEEP_VAE_FIGS) ## one VAE per z_dim in ZDIMS, 15 epochs each, and their figures

# As for vae.pt: the checkpoints (OUT/sweep_vae/vae_z*.pt), then sweep_vae.json
# (the target), then the figures, which their own rule redoes from those files.
SWEEP_VAE_SETTINGS = $(VAE_SETTINGS) ZDIMS=$(ZDIMS)
.PRECIOUS: $(OUT)/sweep_vae.json
$(OUT)/sweep_vae.json: experiments/sweep_vae.py vae.py $(LAB) $(SETUP) \
                       $(call stale,$(OUT)/sweep_vae.json,$(SWEEP_VAE_SETTINGS))
	$(PYTHON) -m experiments.sweep_vae --z-dims $(ZDIMS) --data-root $(DATA) --out-dir $(OUT) --figures-dir $(FIGURES) \
	  --device $(DEVICE) $(LIMIT_ARG) $(THREADS_ARG)
	$(call save,$(SWEEP_VAE_SETTINGS))

$(SWEEP_VAE_FIGS) &: $(OUT)/sweep_vae.json lab/vae_figures.py
	$(PYTHON) -m experiments.sweep_vae --plot-only --out-dir $(OUT) --figures-dir $(FIGURES) --data-root $(DATA)

figures: $(LOGREG_FIGS) $(VAE_FIGS) ## re-render every figure from saved results, no retraining

$(LOGREG_FIGS) &: $(OUT)/logreg.npz
	$(PYTHON) logreg.py --plot-only --out-dir $(OUT) --figures-dir $(FIGURES)

$(VAE_FIGS) &: $(OUT)/vae.pt lab/vae_figures.py
	$(PYTHON) vae.py --plot-only --out-dir $(OUT) --figures-dir $(FIGURES) --data-root $(DATA)

report: $(REPORT) ## one page with every result and figure, read from the saved artifacts

# The sweeps' JSON files are shown when they exist; `make sweep` refreshes the report after them.
$(REPORT): experiments/report.py $(LAB) $(FEATURES_MAT) $(OUT)/logreg.npz $(OUT)/logreg_metrics.json $(OUT)/vae.pt \
           $(OUT)/vae_metrics.json $(LOGREG_FIGS) $(VAE_FIGS) \
           $(wildcard $(OUT)/sweep_logreg.json $(OUT)/sweep_vae.json $(FIGURES)/sweep_*.png $(FIGURES)/vae_*_2d.png) \
           $(SETUP)
	$(PYTHON) -m experiments.report --out-dir $(OUT) --figures-dir $(FIGURES) --report $@

sweep: sweep-logreg sweep-vae ## both sweeps (batch size x lr, and z_dim), then the report
	@$(MAKE) --no-print-directory report

test: $(SETUP) ## run the test suite (python test_all.py)
	$(PYTHON) test_all.py

bench: $(FEATURES_MAT) $(SETUP) ## speed ratios against reference implementations, measured in one run
	$(PYTHON) -m tools.bench --data-root $(DATA) --out-dir $(OUT) --profile

OUT_FILES := mnist_train.mat mnist_test.mat logreg.npz logreg_metrics.json vae.pt vae_metrics.json \
             sweep_logreg.json sweep_vae.json
ALL_FIGS  := $(LOGREG_FIGS) $(VAE_FIGS) $(SWEEP_VAE_FIGS) $(FIGURES)/sweep_logreg.png

# Make deletes no output, even on an error or Ctrl-C (no .DELETE_ON_ERROR; all are precious):
# the scripts write each output atomically and, when interrupted, name the ones they completed.
# Each script writes its target after the files that go with it, and the figures have rules
# of their own, so the next make redoes only what is missing or older than its inputs.
.PRECIOUS: $(addprefix $(OUT)/,$(OUT_FILES)) $(ALL_FIGS) $(REPORT)

# clean removes by name what the pipeline writes (the guards at the end keep OUT, FIGURES
# and REPORT away from tracked files), and the temp files of a run killed mid-write.
temps      = $(foreach f,$(1),$(dir $(f)).$(notdir $(f)).*.tmp)# what lab.files.atomic_path leaves if killed
clean: ## remove generated artifacts, figures and report by name (keeps .venv, data and your files)
	rm -f $(addprefix $(OUT)/,$(OUT_FILES) sweep_vae/vae_z*.pt sweep_vae/.vae_z*.pt.*.tmp) \
	  $(foreach f,$(OUT_FILES),$(call record,$(f))) $(call temps,$(addprefix $(OUT)/,$(OUT_FILES)))
	rm -f $(ALL_FIGS) $(REPORT) $(call temps,$(ALL_FIGS) $(REPORT))
	rmdir $(OUT)/sweep_vae $(OUT) 2>/dev/null || true

distclean: clean ## also remove the venv
	rm -rf $(VENV)

# Settings that Make can check before anything runs (here, after every default is set):
# a bad one stops make with one line, and nothing is started.
check_choice = $(if $(filter-out $(2),$($(1)))$(filter-out 1,$(words $($(1)))),$(error $(1)='$($(1))' is not one of: $(2)))
check_counts = $(if $(strip $(foreach n,$($(1)),$(shell echo '$(n)' | grep -Ev '^[1-9][0-9]*$$'))),$(error $(1)=$($(1)): expected whole number(s) >= 1))
$(call check_choice,DEVICE,auto cpu cuda mps)
$(call check_choice,DTYPE,float32 bfloat16)
$(call check_choice,SWEEP_MODE,reference default)
$(foreach v,LIMIT THREADS SWEEP_BATCH SWEEP_EPOCHS ZDIMS,$(call check_counts,$(v)))
$(foreach v,SWEEP_BATCH SWEEP_LR SWEEP_EPOCHS ZDIMS,$(if $(strip $($(v))),,$(error $(v) is empty; give it at least one value)))

# Make writes, and cleans, only its own files: OUT and FIGURES must not be the checkout or
# above it, nor hold tracked files (a .gitkeep placeholder aside), and REPORT must not be tracked.
CHECKOUT := $(realpath $(dir $(firstword $(MAKEFILE_LIST))))
real      = $(or $(realpath $(1)),$(abspath $(1)))
encloses  = $(filter $(call real,$(1)) $(patsubst %/,%,$(call real,$(1)))/%,$(CHECKOUT))
tracked   = $(shell git -C $(1) ls-files -- $(2) 2>/dev/null | head -1)
check_dir = $(if $(call encloses,$($(1))),$(error $(1)='$($(1))' is or contains this checkout; give a folder of its own)) \
            $(if $(call tracked,$($(1)),. ':!.gitkeep'),$(error $(1)='$($(1))' holds files tracked by git \
              ($(patsubst %/,%,$($(1)))/$(call tracked,$($(1)),. ':!.gitkeep')); give a folder of its own))
$(foreach v,OUT FIGURES,$(call check_dir,$(v)))
$(if $(call encloses,$(REPORT)),$(error REPORT='$(REPORT)' is or contains this checkout; give a file path, e.g. REPORT.md))
$(if $(call tracked,$(dir $(REPORT)),$(notdir $(REPORT))),$(error REPORT='$(REPORT)' is tracked by git (or holds tracked files); give another path, e.g. REPORT.md))
