"""Everything that runs a model at a site: build it with its adapter (:mod:`.workbench`), train it for one round
(:mod:`.training`), score it (:mod:`.evaluation`, and lm-evaluation-harness's tasks: :mod:`.harness`)."""
