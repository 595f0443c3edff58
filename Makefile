# Conveniences over the scripts (the scripts are the source of truth).
.PHONY: test demo bench bench-quick

test:
	scripts/test

demo:
	scripts/demo

# Every benchmark; rewrites the "Latest results" section of BENCHMARKS.md.
bench:
	bench/all.sh

bench-quick:
	bench/all.sh --quick
