"""`distill-guard bench gateway` at a tiny scale: it starts its servers, drives every target, and writes its JSON
with the fields the README quotes (no timing is asserted: numbers from a test machine mean nothing)."""

import json
import os

import pytest
from typer.testing import CliRunner

from guard.cli import app


@pytest.mark.slow
def test_bench_gateway_runs_and_writes_its_result(tmp_path):
    run = CliRunner().invoke(app, ["bench", "gateway", "--samples", "20", "--seconds", "0.3", "--concurrency", "4",
                                   "--rounds", "1", "--stream-samples", "5", "--out", str(tmp_path)])
    assert run.exit_code == 0, run.output
    result = json.loads((tmp_path / "gateway_overhead.json").read_text())
    for target in ("gateway_local", "gateway_upstream", "gateway_replica"):
        for measure in ("latency", "stream_first_token"):
            assert {"p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms"} <= set(result[measure][target])
        assert set(result["meets_targets"][target]) == {"p50", "p99", "requests_per_s", "ttft"}
    assert set(result["throughput"]) == {"direct", "gateway_local", "gateway_upstream", "gateway_replica"}
    assert all(t["requests"] > 0 and t["requests_per_s"] > 0 for t in result["throughput"].values())
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in clock ticks
    for target, load in result["throughput"].items():
        for role, cpu_ms in load["server_cpu_ms_per_request"].items():
            # read from the process that served (an idle one reads 0), per request (not per run), and no more than
            # every core's whole time over the run allows, give or take a tick of /proc's clock
            most = 1000 * result["cpu_count"] / load["requests_per_s"] + tick_ms / load["requests"]
            assert 0 < cpu_ms <= most, (target, role, cpu_ms, most)
    # every request through a gateway left its audit row: 23 and 6 sequential (warm-up included), the 4 that
    # open the load's connections, and the load's own; the local and upstream gateways' in SQLite, the replica's
    # in PostgreSQL
    served = {t: result["throughput"][t]["requests"] + 23 + 6 + 4 for t in result["throughput"]}
    assert result["audit_rows_written"] == {"sqlite": served["gateway_local"] + served["gateway_upstream"],
                                            "postgresql": served["gateway_replica"]}
    assert result["cpu_count"] >= 1 and "uvicorn" in result["versions"] and result["settings"]["concurrency"] == 4
    assert len(result["measured"]["load_average"]) == 3 and len(result["load_average_at_start"]) == 3
