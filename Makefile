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
.PHONY: bench-netns bench-go
.PHONY: image-smoke image-test bench-image
.PHONY: qgfw image checksums repro test-builder test-netns

all: test

# After the unit tests: the podman driver against a real service, the real
# image build compared with checksums/SHA256SUMS (warm runs reuse the input
# cache and the kernel stage), and the image booted in QEMU. Keep this order.
test: setup check unit test-builder image image-smoke image-test

# Installs the Debian packages and host configuration the tests need.
setup:
	./scripts/setup-host.sh

check:
	@bad=$$(gofmt -l $(GOFILES)); if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet -tags "$(ROOT_TAGS)" ./...
	cd firewall && $(GO) vet ./...

unit:
	$(GO) test -tags "$(ROOT_TAGS)" ./...
	cd firewall && $(GO) test ./...

# Boots dist/vmlinuz + dist/initramfs in QEMU (TCG) and waits for the
# firewall's start line on the console; QEMU_MACHINE=microvm boots
# dist/vmlinux instead, QEMU_MEM sets the memory (MB).
image-smoke:
	./scripts/image-smoke.sh dist

# Boots dist/ in QEMU (microvm + vmlinux, TCG) as a Qubes firewall VM: NICs
# on taps in network namespaces (a netvm with dnsmasq and echo servers, two
# clients), xenstore and QubesDB fakes on virtio-serial ports; accept-all,
# ICMP reject, dsthost, rule reload, netvm change, dom0 shutdown. Root.
# QGFW_QEMU_MACHINE=pc boots dist/vmlinuz instead, QGFW_QEMU_MEM sets -m.
image-test:
	cd firewall && QGFW_IMAGE_DIST=$(CURDIR)/dist $(GO) test -count=1 -v -run '^TestImage$$' -timeout 10m ./imagetest/

# The builder CLI.
qgfw:
	$(GO) build -tags "$(ROOT_TAGS)" -o bin/qgfw ./cmd/qgfw

# Builds dist/{vmlinuz,initramfs,SHA256SUMS,buildinfo.json} and compares
# them with checksums/SHA256SUMS (exit 3 on a mismatch).
image: qgfw
	bin/qgfw build

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

# Benchmarks, not part of CI (root): the firewall binary next to Linux
# kernel forwarding + nftables masquerade in network namespaces (report in
# dist/bench/; see bench/README.md for the BENCH_* variables), then the
# firewall module's Go micro-benchmarks.
bench: setup bench-netns bench-go bench-image

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
