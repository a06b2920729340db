# esker — developer tasks. "make" runs lint and test.

GO   ?= go
PKGS ?= ./...

.PHONY: all test fuzz chaos build bench lint dev clean

all: lint test

## test: all tests with the race detector, never cached
test:
	$(GO) test -race -count=1 $(PKGS)

## fuzz: every fuzz target for FUZZTIME each (scripts/fuzz.sh)
FUZZTIME ?= 20s
fuzz:
	bash scripts/fuzz.sh $(FUZZTIME)

## chaos: the fault-injection suite for CHAOS_DURATION (internal/chaostest)
CHAOS_DURATION ?= 10m
chaos:
	ESKER_CHAOS_DURATION=$(CHAOS_DURATION) $(GO) test -race -count=1 -timeout 60m -run TestChaos -v ./internal/chaostest

## build: compile every package and the esker CLI into bin/esker
build:
	$(GO) build $(PKGS)
	$(GO) build -o bin/esker ./cmd/esker

## bench: every Go benchmark (for the commands behind the figures see
## docs/BENCHMARKS.md; "esker bench" compares a node with raw franz-go)
bench:
	$(GO) test -run '^$$' -bench . $(PKGS)

## lint: gofmt check and go vet
lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then \
		echo "gofmt needed on:"; echo "$$unformatted"; \
		echo "run: gofmt -w ."; exit 1; \
	fi
	$(GO) vet $(PKGS)

## dev: embedded broker plus the bank demo node (data in ./esker-data)
dev:
	$(GO) run ./cmd/esker dev

clean:
	rm -rf bin
