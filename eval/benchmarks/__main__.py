"""Run every benchmark: `python -m eval.benchmarks` (or `make bench`). Results land in runs/benchmarks.json."""

import json
from pathlib import Path

from eval.benchmarks import redaction_speed, traffic_speed, trainer_speed, watermark_speed

results = {"trainer_speed": trainer_speed.main(steps=150, rounds=3, batch_size=64),
           "watermark_speed": watermark_speed.main(),
           "traffic_speed": traffic_speed.main(events=50_000),
           "redaction_speed": redaction_speed.main(prompts=256, rounds=5, repeats=20)}
Path("runs").mkdir(exist_ok=True)
Path("runs/benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
print("wrote runs/benchmarks.json")
