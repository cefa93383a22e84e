# Everything a user runs. `make demo` and `make test` are the two commands of README.md.
PYTHON := .venv/bin/python
RUN ?= data/demo
export MUJOCO_GL ?= egl

.PHONY: venv render-libs demo test test-fast browser label loop loop-human bench bench-reward bench-ppo bench-ppo-returns bench-paper bench-teachers bench-labeler circus clean-demo

# PIP_FLAGS go to the install of requirements.txt, e.g. PyTorch's CPU wheels where pip would take a CUDA build
# from PyPI: make demo PIP_FLAGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_FLAGS ?=
venv: .venv/.installed render-libs
.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --upgrade --quiet pip
	.venv/bin/pip install $(PIP_FLAGS) -r requirements.txt
	touch $@

# MuJoCo renders clips headless through EGL (MUJOCO_GL=egl): Mesa's software EGL from Debian's packages where
# it is missing (on a system without apt-get, nothing is installed).
render-libs:
	@{ /sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null; } | grep -q libEGL_mesa.so.0 || \
	  ! command -v apt-get >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri >/dev/null; }

# A short unattended loop with the oracle teacher on HalfCheetah-v5; prints random vs trained return.
demo: venv
	RUN="$(RUN)" ./loop.sh

loop: venv
	RUN="$(RUN)" ./loop.sh

# People label in the browser (make label) while this loop waits for their answers.
loop-human: venv
	RUN="$(RUN)" TEACHER=human ./loop.sh

label: venv
	$(PYTHON) label.py serve --run "$(RUN)"

# The browser test drives Debian's chromium and chromedriver in /usr/bin (another one on PATH would leave it
# skipped); install them if they are missing (CI runs as root).
browser:
	@{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: venv browser
	$(PYTHON) -m pytest -q -n 2 --dist worksteal tests

test-fast: venv
	$(PYTHON) -m pytest -q tests -m "not slow"

bench: bench-ppo bench-reward bench-labeler

# Stable-Baselines3 is installed for this comparison only; it is not a dependency of the project.
bench-ppo: venv
	$(PYTHON) -m pip install --quiet stable-baselines3==2.9.2
	$(PYTHON) bench/bench_ppo.py

# PPO on the true reward at 1M steps, 3 seeds, against CleanRL's published returns. Hopper is the original,
# terminating one here, and both have gymnasium's own rewards (as in the published results), not the paper's
# tasks of the loop (contract.TASK_KWARGS). ~25 min; resumes.
# e.g. make bench-ppo-returns PPO_FLAGS=--overlap PPO_OUT=bench/out/ppo_returns-overlap
PPO_FLAGS ?=
PPO_OUT ?= bench/out/ppo_returns
bench-ppo-returns: venv
	for env in Hopper-v5 HalfCheetah-v5; do for seed in 0 1 2; do \
	  OMP_NUM_THREADS=1 $(PYTHON) train_policy.py --run $(PPO_OUT)/$$env-s$$seed --env $$env --seed $$seed \
	    --reward true --total-steps 1000000 --env-kwargs '{}' --no-plot $(PPO_FLAGS) && \
	  $(PYTHON) collect.py --run $(PPO_OUT)/$$env-s$$seed --evaluate 10 --no-clips || exit 1; \
	done; done

bench-reward: venv
	$(PYTHON) bench/bench_reward.py

bench-labeler: venv
	$(PYTHON) bench/bench_labeler.py

bench-paper: venv
	$(PYTHON) bench/bench_paper.py

# The paper benchmark at 700 labels with each of B-Pref's imperfect teachers (reduced step budget).
bench-teachers: venv
	$(PYTHON) bench/bench_paper.py --envs HalfCheetah-v5 --labels 700 --teachers oracle mistake stochastic myopic skip equal --steps 300000 --steps-per-round 30000 --eval-episodes 5 --out bench/out/teachers

circus: venv
	$(PYTHON) bench/circus.py

clean-demo:
	rm -rf data/demo
