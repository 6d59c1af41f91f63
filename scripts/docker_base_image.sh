#!/usr/bin/env bash
# Makes a local stand-in for the Dockerfile's base image, python:3.11-slim, on a machine that
# reaches Debian's package mirror but not Docker Hub: Debian bookworm (minbase) with Debian's
# Python 3.11, venv and pip, and `python` as a command, imported under that tag.
# It is not the official image (Python 3.11.2 in /usr/bin instead of the latest 3.11 in
# /usr/local/bin), but it runs the Dockerfile's steps unchanged.
# Usage (root, with debootstrap and a running Docker daemon): bash scripts/docker_base_image.sh [TAG]
set -euo pipefail
tag="${1:-python:3.11-slim}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null
ln -sf python3 "$rootfs/usr/bin/python"
# The host's certificate bundle, so that pip inside a build trusts what the host's pip trusts
# (a proxy's own certificate authority, on machines that have one).
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$tag" >/dev/null
echo "$tag: Debian bookworm with $(chroot "$rootfs" python3 --version)"
