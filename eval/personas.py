"""The simulated traffic's personas by name: kept apart from `eval.traffic` (which loads the lab) so that the CLI
can list them in its help without loading anything."""

BENIGN = ("human", "power", "batch", "student", "evaluator", "followup")
ATTACKERS = ("naive", "cot", "slow", "sybil", "swarm", "hydra", "mimic", "decompose", "spread")
