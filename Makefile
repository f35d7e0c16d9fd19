# Two commands on a fresh machine: `make demo` and `make test`. Both set up what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test setup system-deps test-services

demo: setup system-deps
	$(VENV)/bin/tuwen demo

# Two pytest-xdist workers (this machine has two cores). Each xdist_group runs on one worker (--dist loadgroup):
# tests/conftest.py puts the timing-sensitive tests in one group and every other module in its own, and orders
# them longest first (--no-loadscope-reorder keeps that order).
test: setup system-deps test-services
	$(PY) -m pytest -n 2 --dist loadgroup --no-loadscope-reorder

setup: $(VENV)/.installed

# torch + torchvision first, pinned to the pair this machine installs from its own disk (a CUDA build
# that also runs on CPU); then tuwen with the worker and dev extras.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e '.[worker,gateway,flower,dev,clients]'
	touch $@

# Debian packages the demo and the tests run: redis-server and rabbitmq-server (the fixtures start private
# ones on free ports; a system RabbitMQ that the package may start is never used), docker-compose v1
# (offline lint of docker-compose.yml), chromium + a CJK font (screenshots of Flower and of the bulk report),
# espeak-ng (the synthetic Mandarin speech the demo speech model is trained and tested on).
system-deps:
	@command -v redis-server >/dev/null && test -x /usr/lib/rabbitmq/bin/rabbitmq-server \
	  && command -v docker-compose >/dev/null && command -v chromium >/dev/null \
	  && command -v espeak-ng >/dev/null && fc-list | grep -qi wenquanyi || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	   redis-server rabbitmq-server docker-compose chromium fonts-wqy-microhei espeak-ng >/dev/null)

# s3rver (checks S3 signatures and presigned expiry, which moto does not).
test-services:
	@test -d tests/s3rver/node_modules || npm ci --prefix tests/s3rver --no-audit --no-fund --loglevel=error
