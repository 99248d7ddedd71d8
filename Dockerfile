# syntax=docker/dockerfile:1
# mailroom: IMAP and Microsoft Graph mailboxes to a webhook.
#
#   docker build -t mailroom .
#   docker run -v ./mailroom.yml:/etc/mailroom/mailroom.yml:ro -p 8080:8080 mailroom
#
# BASE_IMAGE needs Python 3.11 or later as `python3`, with the venv module; the same image is
# used for both stages so that the virtualenv built in the first one runs in the second. Pin it
# by digest in production (python:3.11-slim-bookworm@sha256:...). Without a registry, a local
# Debian bookworm image with python3 and python3-venv works as well (see docs/operations.md, "Docker").
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

# -- build: wheels only (--only-binary): no compiler is needed here, and none is in the image --
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY mailroom ./mailroom
# constraints.txt pins every dependency (`make lock`): an image built next month has the same.
RUN python3 -m venv /opt/mailroom \
 && /opt/mailroom/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/mailroom/bin/pip install --only-binary=:all: -c constraints.txt /wheels/*.whl \
 && /opt/mailroom/bin/python -m compileall -q /opt/mailroom \
 && /opt/mailroom/bin/mailroom version

# -- run ------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mailroom" \
      org.opencontainers.image.description="Receive email in your application: IMAP IDLE and Microsoft Graph mailboxes to a webhook, at least once." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="GPL-3.0-or-later" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.mailroom.licenses.note="mailroom is GPL-3.0-or-later. It includes aioimaplib, which is under the GPL v3 (GPL-3.0-only on PyPI), so the image is a combined work under the GPL v3. Other dependencies: aiohttp, prometheus-client (Apache-2.0), msal, aiosmtplib, PyYAML, PyJWT (MIT), cryptography (Apache-2.0 or BSD-3-Clause)."
# MAILROOM_HEALTH_URL: what the HEALTHCHECK asks; change it with health.listen's port.
ENV PATH=/opt/mailroom/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MAILROOM_HEALTH_URL=http://127.0.0.1:8080/healthz
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 mailroom \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mailroom \
 && mkdir -p /etc/mailroom
COPY --from=build --chown=root:root /opt/mailroom /opt/mailroom
COPY --chown=root:root LICENSE /usr/share/doc/mailroom/LICENSE
# Readiness for probes that run a command (GitLab's Helm chart: /scripts/healthcheck).
COPY --chown=root:root --chmod=0755 docker/healthcheck /scripts/healthcheck
USER 10001:10001
# /healthz, /readyz, /metrics: the config must say health: {listen: "0.0.0.0:8080"} for other
# containers (and Kubernetes probes) to reach it; the HEALTHCHECK below asks from inside.
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['MAILROOM_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["mailroom"]
CMD ["run", "-c", "/etc/mailroom/mailroom.yml"]
