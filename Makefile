# One command each: `make test`, `make lint`, `make demo`, `make bench`.
# Works on a fresh Debian machine as root: installs what it needs, then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-fast test-image lint docs lock demo demo-serve demo-send bench debs imap-servers venv clean

# constraints.txt pins every dependency (made by `make lock` from pyproject.toml): an install
# next month gets the same versions as CI got today.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

# Debian's dovecot-imapd for the integration tests, the demo and the benchmarks (the system
# service is not used: the fixtures start their own Dovecot with a config in a temp dir),
# redis-server and redis-sentinel for the replica tests (started the same way), and
# ruby-activesupport, which encrypts settings files the way GitLab does for the GitLab tests.
DEBS := dovecot-imapd redis-server redis-sentinel ruby-activesupport
debs:
	@command -v dovecot >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 \
	  && command -v redis-sentinel >/dev/null 2>&1 \
	  && ruby -ractive_support -e '' >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS); \
	  else echo "missing packages: run 'apt-get install $(DEBS)' as root" >&2; exit 1; fi; }

# promtool, which tests/test_monitoring.py checks the alerting rules with: taken out of Debian's
# prometheus package into the venv (installing the package would also start a Prometheus server).
.PHONY: promtool
promtool: venv
	@command -v promtool >/dev/null 2>&1 || test -x $(BIN)/promtool || { cd $(VENV) \
	  && { apt-get download -qq prometheus 2>/dev/null \
	       || { apt-get update -qq && apt-get download -qq prometheus 2>/dev/null; }; } \
	  && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > bin/promtool \
	  && chmod +x bin/promtool && rm -f prometheus_*.deb; }

# Debian's postfix for the test with a real MTA (tests/test_postfix.py), which starts a private
# instance (its own config_directory and queue_directory, loopback ports). Installed with
# debconf's "No configuration" while policy-rc.d forbids starting services: the system's
# Postfix is neither configured nor started (and a policy-rc.d already there is left alone).
.PHONY: postfix
postfix:
	@command -v postfix >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" != 0 ]; then echo "missing package: run 'make postfix' as root" >&2; exit 1; fi; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  ours=; if [ ! -e /usr/sbin/policy-rc.d ]; then ours=1; \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix; \
	  status=$$?; if [ -n "$$ours" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$status; }

# Debian's exim4 for tests/test_exim.py, which starts a private instance. It conflicts with
# postfix, so its binary is taken out of the package into the venv (apt-get download, dpkg-deb
# -x, without its setuid bit: the tests run it as root), never installed; its libraries are,
# where missing, and the user it is built to run as (Debian-exim) is created as its package
# would.
EXIM := $(VENV)/exim/usr/sbin/exim4
EXIM_LIBS := libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libnsl2 libpcre2-8-0
.PHONY: exim
exim: venv
	@test -x $(EXIM) || { mkdir -p $(VENV)/exim && cd $(VENV)/exim \
	  && { apt-get download -qq exim4-daemon-light 2>/dev/null \
	       || { apt-get update -qq && apt-get download -qq exim4-daemon-light; }; } \
	  && dpkg-deb -x exim4-daemon-light_*.deb . && rm -f exim4-daemon-light_*.deb \
	  && chmod u-s usr/sbin/exim4; }
	@! ldd $(EXIM) | grep -q "not found" || DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq $(EXIM_LIBS)
	@id Debian-exim >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
	  --home-dir /nonexistent --shell /usr/sbin/nologin Debian-exim


# Cyrus IMAP and Courier-IMAP, the other IMAP servers the suite runs against
# (tests/servers/cyrus.py, tests/servers/courier.py). Their packages conflict with dovecot-imapd
# (each provides imap-server), so they are never installed: `apt-get download`ed and unpacked
# into $(IMAP_SERVERS) (Courier's compiled-in paths are met in a private mount namespace, see
# courier.py). Only the libraries they link, which conflict with nothing, are apt-get installed.
IMAP_SERVERS := $(VENV)/imap-servers
SERVER_DEBS  := cyrus-common cyrus-imapd sasl2-bin courier-base courier-imap courier-authlib \
  courier-authdaemon courier-authlib-userdb
imap-servers: $(IMAP_SERVERS)/.installed
$(IMAP_SERVERS)/.installed: | venv
	@rm -rf $(IMAP_SERVERS) && mkdir -p $(IMAP_SERVERS)/debs && cd $(IMAP_SERVERS)/debs \
	  && { apt-get download -qq $(SERVER_DEBS) 2>/dev/null \
	       || { apt-get update -qq && apt-get download -qq $(SERVER_DEBS) 2>/dev/null; }; } \
	  && libs="$$(for deb in *.deb; do dpkg-deb -f $$deb Depends; done | tr ',' '\n' \
	       | sed 's/|.*//; s/(.*//; s/ //g' | grep '^lib' | sort -u)" \
	  && { dpkg -s $$libs >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -qq --no-install-recommends $$libs >/dev/null; } \
	  && for deb in *.deb; do dpkg-deb -x $$deb ../root; done && cd .. && rm -rf debs \
	  && touch .installed


test: venv debs promtool postfix exim imap-servers
	$(BIN)/pytest

# The edit loop: everything but the tests marked slow (replicas, many mailboxes, real
# processes, the image, long fuzzing): about 1.5 minutes on a 2-core machine. `make test`
# runs them all.
test-fast: venv debs promtool imap-servers
	$(BIN)/pytest -m "not slow"

# The container image, built and run with podman on a base made from Debian's packages (no
# registry needed): tests/test_image.py (read-only root, uid 10001, the health checks, a
# delivery, the SIGTERM drain, the compose examples). `.ci/run` runs it after `make test`; the
# first run debootstraps the base and downloads mailroom's wheels (a few minutes).
# runc + cgroupfs + explicit ulimits: where crun cannot set rlimits or drive hybrid cgroups.
IMAGE_BASE ?= localhost/debian-python:bookworm
PODMAN     ?= podman --runtime runc --cgroup-manager cgroupfs
test-image: venv debs
	@command -v podman >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 \
	  && command -v runc >/dev/null 2>&1 || { apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap runc; }
	tests/image_base.sh $(IMAGE_BASE)
	MAILROOM_TEST_IMAGE_BASE=$(IMAGE_BASE) MAILROOM_TEST_PODMAN="$(PODMAN)" \
	  MAILROOM_TEST_PODMAN_ARGS="--ulimit nofile=20000:20000 --ulimit nproc=1000:1000" \
	  $(BIN)/pytest -p no:cacheprovider tests/test_image.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

# The documentation site (docs/, mkdocs.yml) in site/; `make lint` checks it (--strict).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: venv debs
	$(BIN)/python examples/demo.py

demo-serve: venv debs
	$(BIN)/python examples/demo.py --serve

# While demo-serve runs: put a message into its mailbox, e.g.
#   make demo-send ARGS="--to nobody@demo.example"   (or --auto-reply, --subject ..., FILE.eml)
ARGS ?=
demo-send: venv
	$(BIN)/python examples/demo.py send $(ARGS)

# bench/backlog.py: one mailbox's 1,000-message backlog on loopback and at a 50 ms round trip
# (bench/delay_proxy.py); bench/many_mailboxes.py: 1,000 mailboxes, plain IMAP (all phases,
# about 5 minutes), then the start, RSS and idle CPU over TLS. py-spy (the bench extra) adds
# wall-time profiles to the CPU-time ones of --profile DIR.
bench: venv debs
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python bench/imap_latency.py
	$(BIN)/python bench/backlog.py
	$(BIN)/python bench/parse_worst.py
	$(BIN)/python bench/many_mailboxes.py
	$(BIN)/python bench/many_mailboxes.py --tls --skip load,outage,big
	$(BIN)/python bench/replicas.py
	$(BIN)/python bench/lmtp.py

# After a change to the dependencies in pyproject.toml: pin them again, for every platform
# (the versions pinned so far stay; `make lock LOCK_FLAGS=--upgrade` takes the newest).
LOCK_FLAGS ?=
lock: venv
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
	  --quiet $(LOCK_FLAGS) -o constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
