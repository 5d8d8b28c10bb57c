# make demo: the main job on the bundled default; make test: the test suite.
# Both create .venv from the pinned requirements on first use.
# make peers: ONNX Runtime and OpenVINO/NNCF on the ONNX export of the seed models, in
# their own .venv-peers (numpy 2); e.g. make peers PEER_MODELS=mobilenet1.0 THREADS=1
PY := .venv/bin/python
PEERS_PY := .venv-peers/bin/python
PEER_MODELS ?= resnet50_v1,resnet101_v1,mobilenet1.0,inceptionv3,ssd_300_vgg16_atrous_voc
PEER_ARGS ?=
ACCURACY_ARGS ?=
THREADS ?= 2
export OMP_NUM_THREADS := $(THREADS)

.PHONY: demo test bench-calibration bench-accuracy bench-seed bench-deploy bench-sweep bench-scale bench-ssd peers clean clean-peers

.venv/.installed: requirements.txt requirements-test.txt requirements-export.txt setup.cfg setup.py
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements-test.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

demo: .venv/.installed
	$(PY) examples/demo.py

# one OpenMP thread: the tests check our code's results exactly, across processes; oneDNN's
# INT8 strided 1x1 conv was not deterministic with 2 threads on AVX2 (now rewritten, see
# README "What is promised"), and no other kernel was proven to be
test: .venv/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# entropy calibration of three GluonCV models at 64 and 512 images, with ORT and NNCF
# calibrating the same ONNX export (in .venv-peers)
CALIBRATION_MODELS ?= resnet50_v1 mobilenet1.0 inceptionv3
bench-calibration: .venv/.onnx-installed .venv-peers/.installed
	for m in $(CALIBRATION_MODELS); do $(PY) benchmarks/calibration.py --model $$m --repeat 3 || exit 1; done

# every family x engine, with the ONNX peers (ORT quantize_static, NNCF), which run in
# .venv-peers; ACCURACY_ARGS=--engines=gluon-int8,mxnet-builtin leaves them out
bench-accuracy: .venv/.installed .venv-peers/.installed
	$(PY) benchmarks/accuracy.py $(ACCURACY_ARGS)

# MXNet rows with the engine/thread settings of gluon_int8.bench.RECOMMENDED_ENV
bench-seed: .venv/.installed
	MXNET_ENGINE_TYPE=NaiveEngine KMP_AFFINITY=granularity=fine,compact,1,0 KMP_BLOCKTIME=1 \
	  $(PY) benchmarks/seed_table.py --runs 5 --latency-runs 30

# the deploy table: the seed models through ONNX Runtime / OpenVINO beside those runtimes'
# own INT8 of the same networks, in one run (README "Speed beside the peers' own INT8")
bench-deploy: .venv/.onnx-installed .venv-peers/.installed
	MXNET_ENGINE_TYPE=NaiveEngine KMP_AFFINITY=granularity=fine,compact,1,0 KMP_BLOCKTIME=1 \
	  $(PY) benchmarks/seed_table.py --models resnet50_v1,mobilenet1.0,inceptionv3 --runs 5 \
	  --peers --rounds 5 --out results/deploy

bench-sweep: .venv/.installed
	$(PY) benchmarks/zoo_sweep.py

# Ray batch inference (1 and N actors) against one process; SCALE_ARGS=--address=auto for a cluster
bench-scale: .venv/.installed
	$(PY) benchmarks/scale.py $(SCALE_ARGS)

# SSD detection: FP32 vs INT8 VOC mAP of the shipped Fashion-MNIST SSD (results/ssd_map.*)
bench-ssd: .venv/.installed
	$(PY) benchmarks/ssd_map.py

# the exporter half runs in .venv (MXNet), which needs the onnx package for it
.venv/.onnx-installed: .venv/.installed requirements-export.txt
	.venv/bin/pip install -q -r requirements-export.txt
	touch $@

.venv-peers/.installed: requirements-peers.txt
	python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q --upgrade pip
	.venv-peers/bin/pip install -q -r requirements-peers.txt
	touch $@

peers: .venv/.onnx-installed .venv-peers/.installed
	$(PY) benchmarks/export_onnx.py --models $(PEER_MODELS)
	$(PEERS_PY) benchmarks/peers.py --models $(PEER_MODELS) $(PEER_ARGS)

clean-peers:
	rm -rf .venv-peers results/onnx

clean:
	rm -rf .venv model build *.egg-info
