# Entry points for people and CI. Each target sets up what it needs (scripts/setup.sh).
.PHONY: setup test demo protos bench clean

setup:          ## create .venv with the core, implemented services and dev tools
	bash scripts/setup.sh

test:           ## the test command: setup + lint + types + import rules + protos + pytest
	bash scripts/test.sh

demo:           ## the main job: axpo run configs/tiny-cpu-axpo.yaml (AXPO on the tiny model, CPU)
	bash scripts/demo.sh

protos:         ## regenerate axpo/v1 from protos/
	bash scripts/gen_protos.sh

bench:          ## benchmarks (JSON)
	bash scripts/setup.sh && for b in verifier tools inference; do .venv/bin/axpo bench $$b --json; done

clean:
	rm -rf .venv node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis
