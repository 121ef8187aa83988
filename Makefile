# qubes-go-firewall — build, test and benchmark entry points.
#
# `make test` is what CI runs (.ci/run): it installs what the tests need on a
# fresh Debian machine, checks formatting and vet, runs the unit tests of both
# modules and then the integration tiers (network namespaces, podman, QEMU).

GO        ?= go
ROOT_TAGS := remote containers_image_openpgp

export GOTOOLCHAIN := local
export GOFLAGS     := -buildvcs=false
export CGO_ENABLED := 0

GOFILES = $(shell find . -name '*.go' -not -path './dist/*' -not -path './.git/*')

.PHONY: all test setup check unit fuzz-smoke bench clean
.PHONY: xen-prepare test-xen bench-xen
.PHONY: bench-netns bench-go
.PHONY: image-smoke image-test bench-image
.PHONY: qgfw image checksums repro test-builder test-netns check-cosign
.PHONY: test-inputs test-offline

all: test

# After the unit tests: the podman driver against a real service, the real
# image build compared with checksums/SHA256SUMS (warm runs reuse the input
# cache and the kernel stage), the image booted in QEMU, then under real Xen.
# Keep this order.
test: setup check unit fuzz-smoke test-builder image test-inputs image-smoke image-test test-xen test-offline

# Installs the Debian packages and host configuration the tests need.
setup:
	./scripts/setup-host.sh

check:
	@bad=$$(gofmt -l $(GOFILES)); if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet -tags "$(ROOT_TAGS)" ./...
	cd firewall && $(GO) vet ./...
	./scripts/check-tracked.sh --self-test
	./scripts/check-tracked.sh

# The README's cosign verify-blob line, as written, run by real cosign
# builds (v2.6.5 and v3.1.3 from the module proxy; COSIGN_VERSIONS) on the
# newest release and on tampered sums. Not part of test: about 5 minutes
# per cosign build, once.
COSIGN_VERSIONS ?= v2.6.5 v3.1.3
check-cosign:
	./scripts/check-cosign.sh $(COSIGN_VERSIONS)

# The unit tests and, in the same run, every benchmark for 10,000
# iterations (enough to fill a NAT table), so that a benchmark whose setup
# no longer holds fails here and not first in make bench (BenchmarkForward,
# 5 s per variant on the netns tier, is left to make bench).
unit:
	$(GO) test -tags "$(ROOT_TAGS)" -bench . -benchtime 10000x ./...
	cd firewall && $(GO) test -bench . -benchtime 10000x -skip '^BenchmarkForward$$' ./...

# Every fuzz target of the firewall module for a bounded time on top of its
# seeds (FUZZ_MAIN=30s for the main ones, FUZZ_OTHER=5s for the rest);
# prints executions per second. About 5 minutes.
fuzz-smoke:
	./scripts/fuzz-smoke.sh

# Boots dist/vmlinuz + dist/initramfs in QEMU (TCG) and waits for the
# firewall's start line on the console; QEMU_MACHINE=microvm boots
# dist/vmlinux instead, QEMU_MEM sets the memory (MB).
image-smoke:
	./scripts/image-smoke.sh dist

# Boots dist/ in QEMU (microvm + vmlinux, TCG) as a Qubes firewall VM: NICs
# on taps in network namespaces (a netvm with dnsmasq and echo servers, two
# clients), xenstore and QubesDB fakes on virtio-serial ports; accept-all,
# ICMP reject, dsthost, rule reload, netvm change; control/shutdown left to
# the guest kernel (make test-xen runs the real shutdown path). Root.
# QGFW_QEMU_MACHINE=pc boots dist/vmlinuz instead, QGFW_QEMU_MEM sets -m.
image-test:
	cd firewall && QGFW_IMAGE_DIST=$(CURDIR)/dist $(GO) test -count=1 -v -run '^TestImage(FitsSmallVM)?$$' -timeout 10m ./imagetest/

# Qubes' own dom0 QubesDB daemon for the Xen tier, at pinned commits of
# github.com/QubesOS/qubes-core-qubesdb and qubes-core-vchan-xen. The sources
# come from QUBES_SRC (snapshot tarballs, checked by sha256 in
# scripts/xen/prepare.sh) when it has them, else from a clone of upstream.
QUBESDB_COMMIT   := aeb3c8d8486673636964bc3beb4819d981dd3920
VCHAN_XEN_COMMIT := a1337c282ffefcfc13a570683c57bc04813038db
QUBES_SRC        ?= $(abspath $(CURDIR)/../shared/third-party/qubes)
# How often each Xen scenario runs in one boot (the deadlock was a race).
XEN_REPEAT       ?= 2
# The firewall VM's memory under Xen, MiB.
XEN_MEM          ?= 32

# Host packages, Xen, the dom0 kernel and rootfs, Qubes' qubesdb-daemon;
# cached under ~/.cache/qgfw/xen, so warm runs only check. Root.
xen-prepare:
	QUBESDB_COMMIT=$(QUBESDB_COMMIT) VCHAN_XEN_COMMIT=$(VCHAN_XEN_COMMIT) QGFW_QUBES_SRC=$(QUBES_SRC) ./scripts/xen/prepare.sh

# The image from dist/ (the one `make image` just built and checked) under
# real Xen 4.17 in QEMU with Qubes' qubesdb-daemon: boot, clients through
# netback, NAT, rule pushes, isolation, anti-spoofing, a netvm change, client
# destroy, shutdown, 32 MiB, BSD netvm mode; see scripts/xen/scenarios.sh.
# Logs of every run in dist/xen-logs/. Root.
test-xen: xen-prepare
	cd firewall && QGFW_XEN_DIST=$(CURDIR)/dist QGFW_XEN_ROUNDS=$(XEN_REPEAT) QGFW_XEN_MEM=$(XEN_MEM) \
		$(GO) test -count=1 -v -run '^TestXen$$' -timeout 60m ./xentest/

# Under the same Xen: the smallest memory the firewall boots and forwards
# with (XEN_BENCH_SIZES, MiB), then iperf3 and ping through it next to a
# Linux firewall VM (Debian's kernel, nftables masquerade) in the same
# topology (XEN_BENCH_RUNS rounds; 0 skips it), then client VMs attached
# one at a time to a firewall of XEN_BENCH_CLIENTS_MEM MiB (default 32),
# all pushing traffic at once at each count of XEN_BENCH_CLIENTS, with the
# firewall's VmHWM (0 skips it).
# Report in dist/bench/xen-<UTC time>.md; asserts nothing. Under TCG the
# ratios mostly measure emulation cost; bench-netns is the CPU
# comparison. About 40 minutes. Root.
XEN_BENCH_SIZES   ?= 64-48-40-32-28-24-20
XEN_BENCH_TIME    ?= 5
XEN_BENCH_RUNS    ?= 3
XEN_BENCH_CLIENTS ?= 4-10
XEN_BENCH_CLIENTS_MEM ?= 32
bench-xen: xen-prepare
	cd firewall && QGFW_XEN_DIST=$(CURDIR)/dist QGFW_XEN_BENCH=1 QGFW_XEN_BENCH_SIZES=$(XEN_BENCH_SIZES) \
		QGFW_XEN_BENCH_TIME=$(XEN_BENCH_TIME) QGFW_XEN_BENCH_RUNS=$(XEN_BENCH_RUNS) \
		QGFW_XEN_BENCH_CLIENTS=$(XEN_BENCH_CLIENTS) QGFW_XEN_BENCH_CLIENTS_MEM=$(XEN_BENCH_CLIENTS_MEM) \
		$(GO) test -count=1 -v -run '^TestXenBench$$' -timeout 120m ./xentest/

# The builder CLI.
qgfw:
	$(GO) build -tags "$(ROOT_TAGS)" -o bin/qgfw ./cmd/qgfw

# Builds dist/{vmlinuz,initramfs,SHA256SUMS,buildinfo.json} and compares
# them with checksums/SHA256SUMS (exit 3 on a mismatch).
image: qgfw
	bin/qgfw build

# With the input cache `make image` filled: the Debian files' source order
# (cache, live mirror, snapshot archive) and hash refusals against real
# HTTP servers on loopback shaped like deb.debian.org and
# snapshot.debian.org, and a hand-edited lock entry stopping the build
# before it contacts podman.
test-inputs:
	QGFW_TEST_INPUTS=1 $(GO) test -tags "$(ROOT_TAGS)" -count=1 -run '^TestInputs' -v ./cmd/qgfw/

# export -> fresh cache and podman store -> import -> build in a network
# namespace without routes; must reproduce checksums/SHA256SUMS. About 12
# minutes (a cold kernel stage). Root.
test-offline: qgfw
	./scripts/test-offline-build.sh

# Rebuilds and writes the artifacts' sums to checksums/SHA256SUMS; run it
# after changing the firewall, the kernel config or a pin.
checksums: qgfw
	bin/qgfw build --update-checksums

# Two cold builds in different directories, at different times, with
# different TZ, umask, LANG and host name must give identical SHA256SUMS.
repro: qgfw
	./scripts/repro.sh

# The firewall binary end to end between network namespaces with real
# servers (dnsmasq, echo, iperf3) and the in-repo QubesDB server. Root;
# `make unit` runs it too, this target runs it alone and verbosely.
test-netns:
	cd firewall && $(GO) test -count=1 -v -timeout 20m ./e2e/

# The podman driver's integration test against a real podman service.
test-builder:
	QGFW_TEST_PODMAN=1 $(GO) test -tags "$(ROOT_TAGS)" -count=1 ./builder/podman/
	./scripts/test-build-with.sh

# Benchmarks, not part of CI (root): the firewall binary next to Linux
# kernel forwarding + nftables masquerade in network namespaces (report in
# dist/bench/; see bench/README.md for the BENCH_* variables), then the
# firewall module's Go micro-benchmarks.
bench: setup bench-netns bench-go bench-image bench-xen

bench-netns:
	bench/netns.sh

bench-go:
	cd firewall && $(GO) test -run='^$$' -bench=. -benchmem ./...

# The built image in QEMU (needs dist/, see `make image`): sizes, boot time
# to the first forwarded packet, memory floor, iperf3 through the VM next to
# the same kernel routing. Report in dist/bench/image-<UTC time>.md.
bench-image:
	cd firewall && QGFW_IMAGE_DIST=$(CURDIR)/dist QGFW_IMAGE_BENCH=1 $(GO) test -count=1 -v -run '^TestImageBench$$' -timeout 30m ./imagetest/

clean:
	rm -rf bin
