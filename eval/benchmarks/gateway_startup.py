"""A gateway in front of an upstream URL: its start time (process start to the first 200 on /healthz) and its
memory (VmRSS of the serving process once it answers), before and after the gateway stopped importing torch,
transformers and datasets, side by side in one run.

"Before" is the code at `BEFORE` (the last commit with guard/server.py), checked out into a temporary
`git worktree`; "after" is this checkout. Each runs its own `python -m guard.cli serve --teacher
http://127.0.0.1:<closed port>/v1 --name m --defense answer-only` with PYTHONPATH and the working directory
pointed at its tree (the child reports which `guard` it imported, so a mix-up shows in the JSON). The upstream
is never asked: /healthz answers from the gateway alone. The sides alternate, `rounds` starts each.

    OMP_NUM_THREADS=1 python -m eval.benchmarks.gateway_startup
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from eval.benchmarks import write_result

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "135392c"  # main with guard/server.py: its code is that of a1d8a2b^ (2c82f09), which only added docs and results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def which_guard(tree: Path, env: dict) -> str:
    done = subprocess.run([sys.executable, "-c", "import guard.cli; print(guard.cli.__file__)"], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def start_once(tree: Path, env: dict, timeout: float = 120.0) -> dict:
    """One `serve` process in `tree`: seconds to its first 200 on /healthz, then its VmRSS in MiB."""
    port = free_port()
    command = [sys.executable, "-m", "guard.cli", "serve", "--teacher", f"http://127.0.0.1:{free_port()}/v1",
               "--name", "m", "--defense", "answer-only", "--port", str(port)]
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"serve exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"serve did not answer /healthz in {timeout} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        status = Path(f"/proc/{server.pid}/status").read_text()
        rss_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        return {"start_seconds": seconds, "rss_mib": rss_kib / 1024}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(rounds: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="gateway-before-") as scratch:
        before = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), BEFORE], check=True,
                       capture_output=True)
        try:
            trees = {"before": before, "after": ROOT}
            envs = {side: {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
                    for side, tree in trees.items()}
            imported = {side: which_guard(tree, envs[side]) for side, tree in trees.items()}
            runs: dict[str, list[dict]] = {side: [] for side in trees}
            for _ in range(rounds):
                for side, tree in trees.items():  # alternating, so a busy spell slows both sides
                    runs[side].append(start_once(tree, envs[side]))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False,
                           capture_output=True)
    result = {"command": "python -m guard.cli serve --teacher http://127.0.0.1:<closed>/v1 --name m "
                         "--defense answer-only", "before_commit": BEFORE, "rounds": rounds,
              "guard_imported_from": {side: str(Path(path).relative_to(trees[side])) if side == "after" else
                                      "<worktree of before_commit>/" + str(Path(path).relative_to(trees[side]))
                                      for side, path in imported.items()}}
    for side, measured in runs.items():
        result[side] = {"start_seconds_median": statistics.median(r["start_seconds"] for r in measured),
                        "rss_mib_median": statistics.median(r["rss_mib"] for r in measured),
                        "runs": [{k: round(v, 3) for k, v in r.items()} for r in measured]}
    result["start_ratio"] = result["before"]["start_seconds_median"] / result["after"]["start_seconds_median"]
    result["rss_ratio"] = result["before"]["rss_mib_median"] / result["after"]["rss_mib_median"]
    path = write_result("gateway_startup", result)
    for side in trees:
        print(f"{side:>6}: {result[side]['start_seconds_median']:.2f} s to /healthz, "
              f"{result[side]['rss_mib_median']:.0f} MiB RSS")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
