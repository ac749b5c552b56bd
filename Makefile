# MNIST deep-learning lab: ResNet-50 features -> logistic regression + ROC, and a VAE.
# `make help` lists the targets; every variable below can be set on the command line.

PYTHON   ?= .venv/bin/python## interpreter (default: the project's own venv, built on demand)
DATA     ?= data## torchvision MNIST root (downloaded there if missing)
OUT      ?= artifacts## where .mat files, checkpoints and metrics go
FIGURES  ?= figures## where the PNG figures go
REPORT   ?= REPORT.md## where make report writes the one-page results report
WEIGHTS  ?= IMAGENET1K_V1## ResNet-50 weights: IMAGENET1K_V1, IMAGENET1K_V2, none (random init) or a .pth path
LIMIT    ?=## use only the first N images of each split (empty = all)
MODE     ?= default## logreg: default (logreg.py's fast training) or reference (the assignment's mlr)
EPOCHS   ?=## epochs of logreg and the VAE (empty = each script's default)
BATCH    ?=## batch size of logreg and the VAE (empty = each script's default)
LR       ?=## learning rate of logreg and the VAE (empty = each script's default)
ZDIM     ?=## the VAE's latent size (empty = vae.py's default)
DEVICE   ?= auto## auto, cpu, cuda or mps
DTYPE    ?= float32## features in float32, or bfloat16 (opt-in: faster only with bf16 units)
THREADS  ?=## CPU threads of extraction and VAE training (empty = torch's; 1 helps on a busy shared VM)
SWEEP_BATCH  ?= 16 64 256 1024## sweep-logreg: batch sizes of the grid
SWEEP_LR     ?= 1e-4 1e-3 1e-2 1e-1## sweep-logreg: learning rates of the grid
SWEEP_EPOCHS ?= 20## sweep-logreg: epochs per configuration
SWEEP_MODE   ?= reference## sweep-logreg: reference (the assignment's mlr) or default (logreg.py's training)
ZDIMS        ?= 2 5 10 20 50## sweep-vae: latent sizes, one VAE each
BOOTSTRAP    ?= python3## the Python that creates .venv

FEATURES  := $(OUT)/mnist_train.mat $(OUT)/mnist_test.mat
LOGREG    := $(OUT)/logreg.npz $(OUT)/logreg_metrics.json
VAE       := $(OUT)/vae.pt $(OUT)/vae_metrics.json
LOGREG_FIGS := $(addprefix $(FIGURES)/,logreg_test_accuracy.png roc.png confusion_matrix.png)
VAE_FIGS  := $(addprefix $(FIGURES)/,vae_loss.png vae_reconstructions.png vae_samples.png vae_latent.png \
               vae_interpolation.png)
ZDIM_FIGS := $(addprefix $(FIGURES)/,sweep_vae_loss.png sweep_vae_reconstructions.png vae_manifold_2d.png \
               vae_latent_2d.png)
SWEEP_FIGS = $(if $(wildcard $(OUT)/sweep_logreg.json),$(FIGURES)/sweep_logreg.png) \
             $(if $(wildcard $(OUT)/sweep_vae.json),$(ZDIM_FIGS))# the sweeps' figures, of the sweeps that ran
include make/settings.mk   # how make decides what to rebuild, and the guards on settings and paths

.DEFAULT_GOAL := help
.PHONY: help setup all features logreg vae figures report sweep sweep-logreg sweep-vae test bench clean distclean

# A goal that trains looks at its figures only once training is done (a second make): with -j, make
# would otherwise look too early and redraw what the run has just drawn.
all: features logreg vae ## the whole pipeline: features, classifier, VAE, figures, report
	@$(MAKE) --no-print-directory figures report
features: $(FEATURES) ## ResNet-50 avgpool features of MNIST train and test
logreg: $(LOGREG) ## logistic regression + ROC on the features (and its figures)
vae: $(VAE) ## train the VAE (and its figures)
figures: $(LOGREG_FIGS) $(VAE_FIGS) $(SWEEP_FIGS) ## re-render every figure from the saved results; never trains
report: $(REPORT) ## one page with every result and figure, from the saved results; never trains
sweep-logreg: $(OUT)/sweep_logreg.json ## batch size x learning rate grid (SWEEP_*), and its figure
	@$(MAKE) --no-print-directory $(FIGURES)/sweep_logreg.png
sweep-vae: $(OUT)/sweep_vae.json ## one VAE per latent size in ZDIMS, and their figures
	@$(MAKE) --no-print-directory $(ZDIM_FIGS)
sweep: sweep-logreg sweep-vae ## both sweeps, then the report
	@$(MAKE) --no-print-directory report

ifdef TRAINS
$(call records,$(FEATURES),$$@,$(FEATURES_SET))
$(call records,$(LOGREG),$(OUT)/logreg.npz,$(LOGREG_SET))
$(call records,$(VAE),$(OUT)/vae.pt,$(VAE_SET))
# One process per split: an interrupted run keeps the split it completed, and -j2 runs both.
$(FEATURES): $(OUT)/mnist_%.mat: extract_features.py lab/mnist.py $(SETUP) $$(call stale,$$@,$$(FEATURES_SET))
	$(PYTHON) extract_features.py --split $* --data-root $(DATA) --weights $(WEIGHTS) --device $(DEVICE) \
	  --dtype $(DTYPE) --out-dir $(OUT) $(RUN)

$(LOGREG) &: logreg.py lab/roc.py lab/features.py $(FEATURES) $(SETUP) $(call stale,$(OUT)/logreg.npz,$(LOGREG_SET))
	$(PYTHON) logreg.py --train-mat $(OUT)/mnist_train.mat --test-mat $(OUT)/mnist_test.mat \
	  $(if $(filter reference,$(MODE)),--reference) $(TRAINING) $(DIRS)

$(VAE) &: vae.py lab/mnist.py $(SETUP) $(call stale,$(OUT)/vae.pt,$(VAE_SET))
	$(PYTHON) vae.py --data-root $(DATA) --device $(DEVICE) $(TRAINING) $(call opt,--z-dim,$(ZDIM)) $(DIRS) $(RUN)
else   # figures and report alone render what exists
$(LOGREG) $(VAE): ; @echo "$@ is missing: run make all (figures and report never train)" >&2; exit 2
endif

ifdef SWEEPS
$(call records,$(OUT)/sweep_logreg.json,$$@,$(SWEEP_LOGREG_SET))
$(call records,$(OUT)/sweep_vae.json,$$@,$(SWEEP_VAE_SET))
$(OUT)/sweep_logreg.json: experiments/sweep_logreg.py logreg.py $(FEATURES) $(SETUP) \
                          $(call stale,$(OUT)/sweep_logreg.json,$(SWEEP_LOGREG_SET))
	$(PYTHON) -m experiments.sweep_logreg --train-mat $(OUT)/mnist_train.mat --test-mat $(OUT)/mnist_test.mat \
	  --batch-sizes $(SWEEP_BATCH) --lrs $(SWEEP_LR) --epochs $(SWEEP_EPOCHS) \
	  --mode $(SWEEP_MODE) $(DIRS)

# sweep_vae.py trains only the latent sizes whose checkpoint is missing or was trained otherwise.
$(OUT)/sweep_vae.json: experiments/sweep_vae.py vae.py $(SETUP) $(call stale,$(OUT)/sweep_vae.json,$(SWEEP_VAE_SET))
	$(PYTHON) -m experiments.sweep_vae --z-dims $(ZDIMS) --data-root $(DATA) \
	  --device $(DEVICE) $(DIRS) $(RUN)
endif

# Figures have rules of their own: they redraw, from the saved results, what a run did not.
$(LOGREG_FIGS) &: $(OUT)/logreg.npz lab/logreg_figures.py
	$(PYTHON) logreg.py --plot-only --out-dir $(OUT) --figures-dir $(FIGURES)
$(VAE_FIGS) &: $(OUT)/vae.pt lab/vae_figures.py
	$(PYTHON) vae.py --plot-only --out-dir $(OUT) --figures-dir $(FIGURES) --data-root $(DATA)
$(FIGURES)/sweep_logreg.png: $(OUT)/sweep_logreg.json
	$(PYTHON) -m experiments.sweep_logreg --plot-only --out-dir $(OUT) --figures-dir $(FIGURES)
$(ZDIM_FIGS) &: $(OUT)/sweep_vae.json lab/vae_figures.py
	$(PYTHON) -m experiments.sweep_vae --plot-only --out-dir $(OUT) --figures-dir $(FIGURES) --data-root $(DATA)

$(REPORT): experiments/report.py $(SETUP) $(wildcard $(RESULTS) $(SWEEP_OUT))
	$(PYTHON) -m experiments.report --out-dir $(OUT) --figures-dir $(FIGURES) --report $@

test: $(SETUP) ## run the test suite (python test_all.py)
	$(PYTHON) test_all.py

bench: $(FEATURES) $(SETUP) ## speed ratios against reference implementations, measured in one run
	$(PYTHON) -m tools.bench --data-root $(DATA) --out-dir $(OUT)

setup: $(SETUP) ## create .venv and install the requirements (other targets do it when needed)
.venv/.installed: requirements.txt requirements-dev.txt
	$(BOOTSTRAP) -m venv .venv
	.venv/bin/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

clean: ## remove what the pipeline wrote, by name (keeps .venv, data and your own files)
	rm -f $(OUTPUTS) $(foreach f,$(OUTPUTS),$(dir $f).$(notdir $f).args $(dir $f).$(notdir $f).*.tmp)
	rm -f $(OUT)/sweep_vae/vae_z*.pt $(OUT)/sweep_vae/.vae_z*.pt.*
	rmdir $(OUT)/sweep_vae $(OUT) 2>/dev/null || true

distclean: clean ## also remove the venv
	rm -rf .venv

help: ## show this help
	@echo "Usage: make TARGET [VAR=value ...]"
	@echo "Targets:"
	@sed -nE 's/^([a-z-]+):.*## (.*)/  \1\t\2/p' $(firstword $(MAKEFILE_LIST)) | expand -t 18
	@echo "Variables (current value):"
	@$(foreach v,$(HELP_VARS),printf "  %-13s %-22s %s\n" "$v" "$(or $($v),(empty))" \
	  "$(shell sed -nE 's/^$v +\?=[^#]*## (.*)/\1/p' $(firstword $(MAKEFILE_LIST)))";)
