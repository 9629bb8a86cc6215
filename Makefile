# jevm developer entry points. The two a new user needs are in README.md:
#   sudo hack/setup     set up a fresh Debian 12 machine and boot a microVM
#   make test           the whole test suite (what .ci/run runs)

.PHONY: all build guest test bench check clean

all: build guest

build:
	cargo build --release -p jevm-runtime -p containerd-shim-jevm-v2

# Guest kernel + initramfs, cached under $${JEVM_CACHE_DIR:-/var/cache/jevm}.
guest:
	hack/build-guest

test:
	hack/test

bench:
	hack/bench

# Can this machine's /dev/kvm run jevm guests?
check: build
	target/release/jevm check

clean:
	cargo clean
