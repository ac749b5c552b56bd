# Make's bookkeeping, included by the Makefile: what each output depends on beyond its files,
# and the guards that stop a bad setting or path with one line before anything runs.

SETUP     := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/.installed)
HELP_VARS := $(shell sed -nE 's/^([A-Z_]+) +\?=.*##.*/\1/p' Makefile)
opt        = $(if $(strip $2),$1 $(strip $2))
DIRS       = --out-dir $(OUT) --figures-dir $(FIGURES)
RUN        = $(call opt,--limit,$(LIMIT)) $(call opt,--threads,$(THREADS))
TRAINING   = $(call opt,--epochs,$(EPOCHS)) $(call opt,--batch-size,$(BATCH)) $(call opt,--lr,$(LR))
RESULTS   := $(FEATURES) $(LOGREG) $(VAE) $(LOGREG_FIGS) $(VAE_FIGS)
SWEEP_OUT := $(addprefix $(OUT)/,sweep_logreg.json sweep_vae.json) $(FIGURES)/sweep_logreg.png $(ZDIM_FIGS)
OUTPUTS   := $(RESULTS) $(SWEEP_OUT) $(REPORT)
# Only the goals that train define the rules that train: `make figures` and `make report` render
# what exists, and only a sweep goal (re)runs a sweep, so no other goal replaces a custom one.
TRAINS    := $(filter-out help figures report test clean distclean setup,$(MAKECMDGOALS))
SWEEPS    := $(filter sweep%,$(MAKECMDGOALS))
# Make deletes no output, even on an error or Ctrl-C: the scripts write each one atomically.
.PRECIOUS: $(OUTPUTS)
.SECONDEXPANSION:

# Settings records: a trained output keeps the settings it was built with in OUT/.NAME.args, which
# the script writes (lab.files.atomic_path) as soon as that output is complete.
# Other settings rebuild it; the same ones however written (DATA=data/, a symlink) do not. A weights
# file counts by its content. DEVICE and THREADS change the speed, not the result.
real        = $(or $(realpath $1),$(abspath $1))
WEIGHTS_ID := $(if $(wildcard $(WEIGHTS)),$(firstword $(shell sha256sum '$(WEIGHTS)' 2>/dev/null)),$(WEIGHTS))
FEATURES_SET     = DATA=$(call real,$(DATA)) WEIGHTS=$(WEIGHTS_ID) LIMIT=$(LIMIT) DTYPE=$(DTYPE)
LOGREG_SET       = MODE=$(MODE) EPOCHS=$(EPOCHS) BATCH=$(BATCH) LR=$(LR)
VAE_SET          = DATA=$(call real,$(DATA)) LIMIT=$(LIMIT) EPOCHS=$(EPOCHS) BATCH=$(BATCH) LR=$(LR) ZDIM=$(ZDIM)
SWEEP_LOGREG_SET = SWEEP_BATCH=$(SWEEP_BATCH) SWEEP_LR=$(SWEEP_LR) SWEEP_EPOCHS=$(SWEEP_EPOCHS) SWEEP_MODE=$(SWEEP_MODE)
SWEEP_VAE_SET    = DATA=$(call real,$(DATA)) LIMIT=$(LIMIT) ZDIMS=$(ZDIMS)
# The record is the script's to write: make exports what it is to say (LAB_RECORD, LAB_SETTINGS) to the
# rule's script, not on a shell command line, so that make runs the script itself (no shell in between
# that a signal would end first).
records     = $(eval $1: export LAB_RECORD = $2)$(eval $1: export LAB_SETTINGS = $(strip $3))
stale       = $(if $(subst x$(strip $2),,x$(file <$(dir $1).$(notdir $1).args)),FORCE)
FORCE:

# Settings: one line and nothing run when one is bad.
choice  = $(if $(filter-out 1,$(words $($1)))$(filter-out $2,$($1)),$(error $1='$($1)' is not one of: $2))
matches = $(if $(shell echo '$($1)' | grep -Ev '^ *($2 *)*$$'),$(error $1='$($1)': expected $3))
$(call choice,DEVICE,auto cpu cuda mps)
$(call choice,DTYPE,float32 bfloat16)
$(call choice,MODE,default reference)
$(call choice,SWEEP_MODE,reference default)
COUNTS  := LIMIT THREADS EPOCHS BATCH ZDIM SWEEP_BATCH SWEEP_EPOCHS ZDIMS
$(foreach v,$(COUNTS),$(call matches,$v,[1-9][0-9]*,whole numbers >= 1))
$(foreach v,LR SWEEP_LR,$(call matches,$v,([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]+)?,positive numbers))
$(foreach v,SWEEP_BATCH SWEEP_LR SWEEP_EPOCHS ZDIMS,$(if $(strip $($v)),,$(error $v is empty; give it a value)))

# Paths: make writes and cleans only its own files; never the checkout, its .git or tracked files.
CHECKOUT := $(realpath .)
inside    = $(filter $(call real,$1) $(call real,$1)/%,$(CHECKOUT))$(filter $(CHECKOUT)/.git%,$(call real,$1))
tracked   = $(shell git ls-files -- '$1' 2>/dev/null | grep -v '/.gitkeep$$' | head -1)
$(foreach v,DATA OUT FIGURES REPORT,$(if $(filter-out 1,$(words $($v))),\
  $(error $v='$($v)' must be one path without spaces)))
$(foreach v,OUT FIGURES REPORT,$(if $(call inside,$($v)),$(error $v='$($v)' is or contains this checkout (or is in \
  its .git); give a path of its own)))
$(foreach v,OUT FIGURES REPORT,$(if $(call tracked,$($v)),$(error $v='$($v)' holds files tracked by git \
  ($(call tracked,$($v))); give a path of its own)))
$(if $(filter-out %.md,$(REPORT)),$(error REPORT='$(REPORT)' must name a .md file of its own (not a folder \
  nor a file tracked by git nor another output of the pipeline)))
