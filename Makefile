# Thin wrappers over ./dev (which also works where make is not installed).
.PHONY: run test lint setup
setup: ; ./dev setup
run: ; ./dev run
test: ; ./dev test
lint: ; ./dev lint
