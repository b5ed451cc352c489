# Two commands do all set-up from a fresh clone (README "Quick start"):
#   make serve   - install everything, then start the server
#   make test    - install everything, then run the whole test suite
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
CHECKPOINT ?= s1-mini

.PHONY: setup serve serve-tiny test bench

setup:
	@bash scripts/setup.sh

serve: setup
	$(PY) -m server serve --checkpoint $(CHECKPOINT) --host $(HOST) --port $(PORT)

# No weights on this machine? A tiny random checkpoint in the published layout: every path runs, it speaks noise.
serve-tiny: setup
	@[ -f checkpoints/tiny-s1-mini/config.json ] || $(PY) -m engine make-tiny-checkpoint --family s1-mini checkpoints/tiny-s1-mini
	$(PY) -m server serve --checkpoint checkpoints/tiny-s1-mini --host $(HOST) --port $(PORT)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_generate.py
