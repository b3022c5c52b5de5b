# make demo: venv + synthetic demo data + notebook training (headless) + inference on the demo scenes.
# make test: the test suite (CI); make test-fast: without the tests marked slow.
# make realdata: a small real labelled set (SpaceNet Atlanta buildings, 0.5 m) in realdata/atlanta.
PYTHON ?= python3
PY := .venv/bin/python

# demo settings: sized to run in a few minutes on 2 CPU cores (random-init encoder: offline)
DEMO_EPOCHS ?= 6
DEMO_TRAIN ?= 320
DEMO_VAL ?= 80
# the notebook's TrainConfig overrides (YAML for papermill -y)
DEMO_SETTINGS = {data: demo_data/patches, epochs: $(DEMO_EPOCHS), pretrained: false, max_train: $(DEMO_TRAIN), max_val: $(DEMO_VAL)}

.PHONY: demo demo-data train-demo infer-demo readme-figures readme-results experiments realdata test test-fast clean-demo

.venv/.installed: requirements.txt
	$(PYTHON) -m venv .venv
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo-data: .venv/.installed
	$(PY) -m tools.demo_data --out demo_data

train-demo: demo-data
	$(PY) -m papermill train.ipynb checkpoints/train_demo.ipynb --log-output --progress-bar -y "SETTINGS: $(DEMO_SETTINGS)"

readme-results: .venv/.installed  # the numbers in README.md and docs/ from results/**/experiments.md
	$(PY) -m research.make_readme_results

readme-figures:  # the README's figures from the last demo run (training never writes into images/)
	cp checkpoints/output.png checkpoints/results.png images/

infer-demo: .venv/.installed
	$(PY) -c "import shutil, pathlib; [shutil.copy(p, 'input_images') for p in sorted(pathlib.Path('demo_data/scenes').glob('*.tif')) if not (pathlib.Path('input_images') / p.name).exists()]"
	$(PY) infer.py --checkpoint checkpoints/best_model.pth --input input_images --output output_images

demo: train-demo infer-demo

experiments: demo-data  # about 3 hours on 2 CPU cores; resumes where it stopped
	$(PY) -m research.experiments --preset demo

realdata: .venv/.installed  # downloads the solaris 0.4.0 wheel once (17.8 MB); a finished set is not redone
	$(PY) -m tools.prepare_realdata

test: .venv/.installed
	$(PY) -m pytest -q

# the quick lane: without the tests marked slow, one torch thread (the tensors are tiny; two threads per
# process on a busy 2-core CPU spin-wait: 110 s instead of 44 s, measured with one other job running)
test-fast: .venv/.installed  # one torch thread per process, one process per core (pytest-xdist)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n 2

clean-demo:
	rm -rf demo_data checkpoints/*.pth checkpoints/*.pt checkpoints/*.png checkpoints/history.json \
		checkpoints/train_demo.ipynb output_images/*_mask.*
