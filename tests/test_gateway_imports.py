"""A gateway in front of an upstream URL loads no model, so it imports no torch, transformers or datasets: it
starts in a fraction of the time and memory (eval/benchmarks/gateway_startup.py measures both). Each check runs
in a fresh interpreter, since this test process has long imported them all."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets")

# `distill-guard serve` in front of an upstream, as a user runs it, up to the point where it would bind its port:
# uvicorn.run is replaced by a client that runs the app's lifespan (the upstream teacher built, the batcher
# started) and asks /healthz, then reports what the process imported.
SERVE = """
import json, sys
import guard.cli as cli
from starlette.testclient import TestClient

def run(app, **kwargs):
    with TestClient(app) as client:
        health = client.get("/healthz").json()
    print(json.dumps({"health": health, "modules": sorted(sys.modules)}))

cli.uvicorn.run = run
cli.app(["serve", "--teacher", "http://127.0.0.1:9/v1", "--name", "m", "--defense", "DEFENSE"],
        standalone_mode=False)
"""

LIGHT = ("guard.gateway.app", "guard.gateway.routes", "guard.gateway.store", "guard.gateway.shared_state",
         "guard.gateway.admin", "guard.openai_teacher", "guard.redaction", "guard.reasoning", "guard.prompts",
         "guard.teacher", "guard.load", "guard.defenses")


def imported(code: str) -> tuple[str, set[str]]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report.get("health"), {m.split(".")[0] for m in report["modules"]}


@pytest.mark.parametrize("defense", ["none", "answer-only", "truncate:12+summary"])
def test_an_upstream_gateway_imports_no_model_library(defense):
    health, modules = imported(SERVE.replace("DEFENSE", defense))
    assert health == {"status": "ok", "model": "m"}
    assert not modules & set(HEAVY), f"serve --teacher http://... --defense {defense} imported {modules & set(HEAVY)}"
    assert "sklearn" not in modules  # the monitor's: only `--defense monitor` needs it


@pytest.mark.parametrize("module", LIGHT)
def test_the_core_and_the_gateway_import_without_torch(module):
    _, modules = imported(f"import json, sys, {module}; print(json.dumps({{'modules': sorted(sys.modules)}}))")
    assert not modules & set(HEAVY), f"{module} imports {modules & set(HEAVY)}"
