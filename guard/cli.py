"""The one command line: `distill-guard`."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub at run time

app = typer.Typer(help="Protect a served language model against distillation, and detect it after the fact.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
lab = typer.Typer(help="The reference lab: the built-in world, task and teachers.", no_args_is_help=True)
app.add_typer(lab, name="lab")
console = Console()

TeacherOpt = Annotated[str, typer.Option(help="'reference', 'reference:teacher-b', a local model directory, "
                                              "or an OpenAI-compatible base URL")]


@app.command()
def demo(teacher: TeacherOpt = "reference", show: int = 6, api_key: str | None = None, model: str | None = None):
    """Show the reference lab: a teacher answering held-out 2-hop questions, and its accuracy."""
    from eval.metrics import capability
    from eval.reference.world import reference_task
    from guard.teacher import load_teacher

    start = time.perf_counter()
    task = reference_task()
    chosen = load_teacher(teacher, api_key=api_key, model=model)
    console.print(f"[bold]reference task[/]: {len(task.eval_items)} held-out 2-hop questions, "
                  f"{len(task.query_pool)} prompts in the attacker's pool; teacher: {chosen.name}")
    accuracy, completions = capability(chosen, task)
    table = Table("question", "reasoning (as served)", "answer", "gold", "ok", show_lines=True)
    for item, completion in list(zip(task.eval_items, completions))[:show]:
        ok = task.is_correct(completion.text, item.answer)
        table.add_row(item.prompt.strip().removeprefix("question: "), completion.reasoning or "",
                      completion.answer, item.answer, "[green]yes[/]" if ok else "[red]no[/]")
    console.print(table)
    low, high = accuracy.clopper_pearson()
    console.print(f"held-out 2-hop accuracy (greedy): [bold]{accuracy.value:.1%}[/] "
                  f"({accuracy.correct}/{accuracy.total}; exact 95% CI {low:.1%}-{high:.1%}) "
                  f"in {time.perf_counter() - start:.1f} s")


@lab.command("build")
def lab_build(only: Annotated[list[str] | None, typer.Option(help="teacher-a and/or teacher-b")] = None):
    """Rebuild the tokenizer, the teachers and the student config, one after the other (`make lab` runs the
    two teachers in parallel, as shipped)."""
    from eval.reference.build import build, compare_phrasing

    build(only)
    if not only:
        console.print(compare_phrasing())


@app.command()
def serve(teacher: TeacherOpt = "reference", host: str = "127.0.0.1", port: int = 8000,
          api_key: Annotated[list[str] | None, typer.Option(help="accepted bearer keys; none means open")] = None,
          name: str | None = None):
    """Serve a teacher behind an OpenAI-compatible API (chat completions and completions)."""
    import uvicorn

    from guard.server import create_app
    from guard.teacher import load_teacher

    served = name or (teacher.partition(":")[2] or "teacher-a" if teacher.startswith("reference") else teacher)
    uvicorn.run(create_app(lambda: load_teacher(teacher), served, set(api_key or ())), host=host, port=port)


if __name__ == "__main__":
    app()
