#!/usr/bin/env bash
# Make a local base image for the Dockerfile from Debian's packages, for hosts that reach no
# image registry: debootstrap a minimal bookworm with Python 3.11, import it into podman.
# Usage: tests/image_base.sh [IMAGE]   (default localhost/debian-python:bookworm)
set -euo pipefail
image=${1:-localhost/debian-python:bookworm}
if podman image exists "$image"; then
  echo "image-base: $image exists"
  exit 0
fi
rootfs=$(mktemp -d /var/tmp/mailroom-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" http://deb.debian.org/debian
changes=(--change 'CMD ["/bin/bash"]')
# Behind a TLS-inspecting proxy the build's pip needs the host's CA bundle.
bundle=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$bundle" ] && [ -f "$bundle" ]; then
  cp "$bundle" "$rootfs/etc/ssl/certs/host-ca-bundle.crt"
  changes+=(--change "ENV PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt")
fi
tar -C "$rootfs" -c . | podman import "${changes[@]}" - "$image"
echo "image-base: imported $image"
