# jevm developer entry points. The two a new user needs are in README.md:
#   sudo hack/setup     set up a fresh Debian 12 machine and boot a microVM
#   make test           the whole test suite (what .ci/run runs)
#   sudo make install   install jevm and register it with containerd

.PHONY: all build guest test e2e test-image install bench check clean

all: build guest

build:
	cargo build --release -p jevm-runtime -p containerd-shim-jevm-v2

# Guest kernel + initramfs, cached under $${JEVM_CACHE_DIR:-/var/cache/jevm}.
guest:
	hack/build-guest

test:
	hack/test

# containerd end to end: every ctr command under runc and jevm, compared.
e2e:
	hack/e2e

# The busybox OCI image the containerd tests import (no registry needed).
test-image:
	hack/test-image

# Binaries to $(PREFIX)/bin, guest to /usr/share/jevm, /etc/jevm/config.toml
# (kept if present), the jevm runtime added to /etc/containerd/config.toml.
# DESTDIR=/some/scratch/root installs there instead (no containerd restart).
PREFIX ?= /usr/local
install:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" hack/install

bench:
	hack/bench

# Can this machine's /dev/kvm run jevm guests?
check: build
	target/release/jevm check

clean:
	cargo clean
