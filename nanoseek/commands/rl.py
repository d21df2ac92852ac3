"""Reasoning commands: `nanoseek tasks`, `nanoseek grpo`, `nanoseek distill`, `nanoseek eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..checkpoint import load_model_and_tokenizer
from ..cli import EXIT_OK, add_recipe_arguments, command, how_run_ended, recipe_overrides
from ..errors import ConfigError
from ..eval import markdown_table, summary_line, write_eval
from ..eval.tasks import evaluate_task
from ..infer import check_generation
from ..infer.compute import inference_precision
from ..infer.int8_load import load_int8_model_and_tokenizer
from ..precision import PRECISIONS
from ..tasks import TASKS, get_task, write_chat_jsonl
from ..tasks.dataset import DATASET_OPTIONS, EXPORT_OPTIONS, export_task, load_dataset
from ..train.distill import distill
from ..train.grpo import grpo, grpo_recipe_fields, load_grpo_recipe
from ..train.recipe import read_recipe_file
from .infer import add_quantize_argument


def _threads(value: int) -> None:
    """--threads: torch's CPU threads (0: torch's default)."""
    if value < 0:
        raise ConfigError(f"threads must be a positive integer (0: torch's default), got {value}")
    if value:
        torch.set_num_threads(value)


# ---- datasets (tasks write, distill, eval) -----------------------------------------------------------
def _dataset_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a dataset task (nanoseek/tasks/dataset.py); --dataset itself is added by the caller."""
    g = p.add_argument_group("dataset options (with --dataset; defaults in docs/reasoning.md)")
    g.add_argument("--test-file", type=Path, metavar="FILE", help="the test split from a second file")
    for role, default in (("prompt", "question/problem/prompt"), ("answer", "answer/solution/final_answer"),
                          ("trace", "reasoning/trace"), ("system", "system"), ("split", "split")):
        g.add_argument(f"--{role}-field", metavar="NAME", help=f"the {role} column (default: {default})")
    g.add_argument("--test-fraction", type=float, metavar="F",
                   help="test share when splitting by a hash of the question (default 0.1; 1: all test)")
    g.add_argument("--verifier", metavar="NAME", help="math (default), exact, numeric, choice or regex")
    g.add_argument("--tolerance", type=float, help="the numeric verifier's relative tolerance (default 1e-6)")
    g.add_argument("--template", help="prompt template with {question}, or default / plain")
    g.add_argument("--reply-format", metavar="FORMAT", help="after </think>: answer, boxed or either (default)")


def _task_or_dataset(args: argparse.Namespace):
    """The built-in task args.task, or the DatasetTask of args.dataset with its options."""
    options = {k: getattr(args, k) for k in DATASET_OPTIONS}
    if getattr(args, "dataset", None) is None:
        given = [k for k, v in options.items() if v is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is a dataset option: it needs --dataset FILE")
        if not args.task:
            raise ConfigError("name a task or give --dataset FILE")
        return get_task(args.task)
    if getattr(args, "task", None):
        raise ConfigError(f"give either a task ({args.task!r}) or --dataset, not both")
    return load_dataset(args.dataset, **options)


# ---- nanoseek tasks --------------------------------------------------------------------------------
def _tasks_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tasks_action", metavar="<action>", required=True)
    sub.add_parser("list", help="the registered tasks", description="the registered tasks")
    show = sub.add_parser("show", help="a few problems with the solver's reply",
                          description="a few problems of a task with the solver's step-by-step reply")
    show.add_argument("task")
    show.add_argument("--n", type=int, default=2)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--split", default="train", choices=("train", "test"))
    write = sub.add_parser("write", help="solver traces as chat JSONL (cold-start SFT data)",
                           description="write n solver-trace conversations as chat JSONL, the input of "
                                       "`nanoseek data prepare --format chat`")
    write.add_argument("task", nargs="?", help="a built-in task (or --dataset FILE)")
    write.add_argument("--dataset", type=Path, metavar="FILE", help="a dataset's traces instead of a task's")
    write.add_argument("--n", type=int, required=True, help="number of problems (a dataset: at most all)")
    write.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--split", default="train", choices=("train", "test"))
    write.add_argument("--difficulty", type=int, help="a fixed difficulty level (default: the task's mix)")
    _dataset_arguments(write)
    export = sub.add_parser("export", help="a built-in task's problems as a dataset file (JSONL)",
                            description="write n problems of a built-in task as JSONL rows (question, answer, "
                                        f"reasoning, split); read back with --dataset FILE {EXPORT_OPTIONS} "
                                        "they score exactly as the task")
    export.add_argument("task")
    export.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    export.add_argument("--n", type=int, default=1000, help="number of problems (default 1000)")
    export.add_argument("--split", default="test", choices=("train", "test"))
    export.add_argument("--seed", type=int, help="default 1234 for test (the problems `nanoseek eval` draws), "
                                                 "0 for train")


@command("tasks", "reasoning tasks: list them, show solver traces, write cold-start chat JSONL", _tasks_arguments)
def cmd_tasks(args: argparse.Namespace) -> int:
    if args.tasks_action == "list":
        for name, task in TASKS.items():
            print(f"{name:<20} {task.description}")
        return EXIT_OK
    if args.tasks_action == "write":
        task = _task_or_dataset(args)
        path = write_chat_jsonl(task, args.out, args.n, seed=args.seed, split=args.split,
                                difficulty=args.difficulty)
        lines = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{lines:,} {task.name} {args.split} conversations -> {path}")
        return EXIT_OK
    task = get_task(args.task)
    if args.tasks_action == "export":
        seed = args.seed if args.seed is not None else (1234 if args.split == "test" else 0)
        path = export_task(task, args.out, args.n, seed=seed, split=args.split)
        print(f"{args.n:,} {task.name} {args.split} problems -> {path}; read them as the task with: "
              f"--dataset {path} {EXPORT_OPTIONS}")
        return EXIT_OK
    for p in task.generate(args.n, seed=args.seed, split=args.split):
        print(f"user: {p.prompt}\nassistant: <think>\n{task.completion(p)}\n")
    return EXIT_OK


# ---- nanoseek grpo ---------------------------------------------------------------------------------
def _grpo_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, grpo_recipe_fields(), "GRPO recipe")


@command("grpo", "reinforcement learning with verifiable rewards (GRPO / DAPO / Dr. GRPO) on a task",
         _grpo_arguments)
def cmd_grpo(args: argparse.Namespace) -> int:
    summary = grpo(load_grpo_recipe(args.recipe, recipe_overrides(args)))
    print(f"{how_run_ended(summary)} step {summary['step']} ({summary['rollout_tokens']:,} rollout tokens, "
          f"{summary['wall_seconds']:.0f}s)")
    print(f"model: {summary['model']}")
    return EXIT_OK


# ---- nanoseek distill ------------------------------------------------------------------------------
def _distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", type=Path, required=True, metavar="DIR", help="teacher model (or run) folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="task to sample (see `nanoseek tasks list`)")
    source.add_argument("--dataset", type=Path, metavar="FILE", help="or the train problems of a dataset file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for traces.jsonl, distill.json, data/ and student/")
    p.add_argument("--problems", type=int, default=1000, help="train-split problems to sample (default 1000)")
    p.add_argument("--samples", type=int, default=4, help="teacher samples per problem (default 4)")
    p.add_argument("--keep", type=int, default=1, help="correct traces kept per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, help="default: 1.5x the longest solver reply")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per generation batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=int)
    student = p.add_mutually_exclusive_group()
    student.add_argument("--student-preset", metavar="NAME", help="a new student from a preset (default tiny)")
    student.add_argument("--student-init", metavar="DIR", help="a student initialised from a model folder")
    p.add_argument("--student-model", metavar="JSON", help="ModelConfig overrides of a new student (JSON)")
    p.add_argument("--student-recipe", type=Path, metavar="FILE",
                   help="TrainRecipe fields for the student's SFT (TOML/YAML); out/data/mode are set by distill")
    p.add_argument("--sft-steps", type=int, help="student SFT steps (default 200 or the recipe's)")
    p.add_argument("--no-train", action="store_true", help="only sample and write the traces")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    _dataset_arguments(p)


@command("distill", "sample a teacher, keep its correct traces (rejection sampling), SFT a student on them",
         _distill_arguments)
def cmd_distill(args: argparse.Namespace) -> int:
    _threads(args.threads)
    task = _task_or_dataset(args)
    student = dict(read_recipe_file(args.student_recipe)) if args.student_recipe else {}
    for key in ("out", "data", "mode", "tokenizer"):
        student.pop(key, None)
    if args.student_preset:
        student.update(preset=args.student_preset, init_from=None, config=None)
    if args.student_init:
        student.update(init_from=args.student_init, preset=None, config=None)
    if args.student_model:
        try:
            student["model"] = json.loads(args.student_model)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--student-model is not valid JSON: {e}") from None
    if args.sft_steps is not None:  # 0 or less: the recipe says why
        student["max_steps"] = args.sft_steps
    stats = distill(args.teacher, task, args.out, n_problems=args.problems, samples_per_problem=args.samples,
                    keep_per_problem=args.keep, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                    difficulty=args.difficulty, student=student, train_student=not args.no_train,
                    progress=sys.stderr.isatty())
    print(f"kept {stats['kept_traces']:,} traces from {stats['samples']:,} samples "
          f"({100 * stats['acceptance_rate']:.1f}% correct) -> {stats['traces']}")
    if "student" in stats:
        print(f"student: {stats['student']['model']}")
    return EXIT_OK


# ---- nanoseek eval ---------------------------------------------------------------------------------
def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="PATH", help="a model folder or a run folder (with model/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="task to evaluate on (see `nanoseek tasks list`)")
    source.add_argument("--dataset", type=Path, metavar="FILE",
                        help="or the test split of a dataset file (JSONL, JSON, CSV, Parquet)")
    p.add_argument("--n", type=int, default=1000, help="held-out problems (default 1000; a dataset: at most all)")
    p.add_argument("--k", type=int, default=8, help="samples per problem for pass@1/pass@k/maj@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--max-new-tokens", type=int, help="default: 1.5x the longest solver reply")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per generation batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--difficulty", type=int, help="only problems of this difficulty level")
    p.add_argument("--tokenizer", type=Path, help="default: the tokenizer files in the model folder")
    p.add_argument("--out", type=Path, help="folder for eval-TASK.json, eval-TASK.md and "
                                            "eval-TASK-completions.jsonl (every completion with its verdict)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    _dataset_arguments(p)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="how generation computes: fp32, bf16 or auto (default; see nanoseek chat --help)")
    add_quantize_argument(p)


@command("eval", "held-out accuracy on a reasoning task or dataset: greedy, pass@1 over k samples, pass@k, maj@k",
         _eval_arguments)
def cmd_eval(args: argparse.Namespace) -> int:
    _threads(args.threads)
    if args.n < 1 or args.k < 0 or (args.no_greedy and args.k == 0):
        raise ConfigError("need --n >= 1, --k >= 0 and something to measure (greedy or k > 0)")
    check_generation(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size)  # before the model loads
    # the plan (a bad --precision/--quantize pair, the int8 kernel probe) before the model loads
    plan = inference_precision(args.precision, "cpu", args.quantize) if args.quantize != "none" else args.precision
    task = _task_or_dataset(args)
    problems = task.generate(args.n, seed=1234, split="test", difficulty=args.difficulty)
    load = load_int8_model_and_tokenizer if args.quantize == "int8" else load_model_and_tokenizer
    model, tok = load(args.path, args.tokenizer)  # int8: streamed into int8, never the fp32 model
    result = evaluate_task(model, tok, task, problems=problems, k=args.k, temperature=args.temperature,
                           top_p=args.top_p, greedy=not args.no_greedy, max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, seed=args.seed, progress=sys.stderr.isatty(),
                           precision=plan)
    result["model"] = str(args.path)
    print(f"precision: {result['precision_detail']}", file=sys.stderr)
    if args.out:
        json_path, md_path = write_eval(result, args.out, str(args.path))
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("per_")}, indent=2))
    else:
        print(summary_line(result))
        print(markdown_table([result], [str(args.path)]))
    return EXIT_OK
