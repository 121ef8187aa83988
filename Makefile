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

all: test

test: setup check unit

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

clean:
	rm -rf bin
