"""Bring your own task and your own endpoint: the same code path as the embedded default.

1. Write a task as JSONL (prompt, answer, optional reasoning) and load it with a named grader.
2. Serve a teacher behind an OpenAI-compatible API on loopback (any vendor URL works the same way).
3. Measure the teacher's capability on the task through that endpoint, and locally, and compare.

    python examples/bring_your_own.py [--items 40]
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from eval.metrics import capability
from eval.reference.world import reference_task
from eval.task import load_task
from guard.gateway.app import create_app
from guard.openai_teacher import OpenAITeacher
from eval.reference import load_teacher


def main(items: int, port: int) -> None:
    # 1. A custom task file. Here its rows come from the reference world; yours come from anywhere.
    rows = [{"prompt": i.prompt, "answer": i.answer, "split": "eval"} for i in reference_task().eval_items[:items]]
    rows += [{"prompt": i.prompt, "answer": i.answer, "split": "pool"} for i in reference_task().query_pool[:items]]
    path = Path(tempfile.mkdtemp()) / "my_task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task(path, grader="exact")
    print(f"loaded {path.name}: {len(task.eval_items)} evaluation items, {len(task.query_pool)} in the pool")

    # 2. An OpenAI-compatible endpoint serving teacher-a, with an API key.
    local = load_teacher("reference")
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: local, "teacher-a", {"sk-demo"}),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    # 3. Capability through HTTP and locally: the endpoint is just another Teacher.
    remote = OpenAITeacher(f"http://127.0.0.1:{port}/v1", model="teacher-a", api_key="sk-demo")
    over_http, completions = capability(remote, task)
    in_process, _ = capability(local, task)
    server.should_exit = True
    print(f"example answer over HTTP: {completions[0].text!r}")
    print(f"accuracy over HTTP: {over_http.value:.3f}   in process: {in_process.value:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    main(args.items, args.port)
