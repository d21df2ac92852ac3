"""The import graph between nanoseek's top-level parts, and every arrow that goes up the layering.

Reads the source with `ast` (nothing is imported), so it sees imports inside functions too. Each
arrow is `A -> B  [top N, local M]`: N import statements at module top, M inside functions or
classes (a statement naming modules of two parts counts once for each); a command module loaded by
name (cli's COMMAND_MODULES) counts as `dynamic`. The layering is DESIGN.md's, bottom first:

    (errors, runio) -> config -> model -> checkpoint -> (data, tasks) -> (train, infer)
    -> (serve, eval) -> cli/commands

with the parts DESIGN.md does not name placed where their imports put them (tokenizer and params
beside checkpoint, cost beside data, export beside infer, demo beside eval). An arrow from a part to
one in a higher layer is flagged UP, and so are the pairs DESIGN.md forbids outright (train <-> eval);
a part in no layer is flagged UNPLACED. Exit code 1 when anything is flagged.

    python bench/imports_graph.py [path/to/nanoseek]
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "nanoseek"
LAYERS = [  # bottom first; parts in one layer may import each other
    ("errors", "runio", "precision"),
    ("config",),
    ("model",),
    ("checkpoint", "tokenizer", "params"),
    ("data", "tasks", "cost"),
    ("train", "infer", "export"),
    ("__init__",),  # the public API: nanoseek.load_model, generate, ...
    ("serve", "eval", "demo"),
    ("cli", "commands", "__main__"),
]
LAYER_OF = {part: i for i, layer in enumerate(LAYERS) for part in layer}
FORBIDDEN = {("train", "eval"), ("eval", "train")}  # DESIGN.md: neither imports the other


def part_of(module: str) -> str:
    """'nanoseek.train.grpo' -> 'train'; 'nanoseek' (the package itself) -> '__init__'."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative levels resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_module(root: Path, module: str) -> bool:
    """Whether the dotted name is a module or package of the tree under `root`."""
    path = root.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, module: str, root: Path) -> list[tuple[str, str]]:
    """(imported nanoseek module, 'top' | 'local' | 'dynamic') for every import in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, local: bool) -> None:
        kind = "local" if local else "top"
        if isinstance(node, ast.Import):
            found.extend((a.name, kind) for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, module, is_package)
            if target.split(".")[0] == PACKAGE:  # `from .. import infer` imports the module nanoseek.infer
                named = {f"{target}.{a.name}" if is_module(root, f"{target}.{a.name}") else target
                         for a in node.names}
                found.extend((name, kind) for name in sorted(named))
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMMAND_MODULES"
                                                  for t in node.targets):
            found.extend((c.value, "dynamic") for c in ast.walk(node.value)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str))
        inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def graph(root: Path) -> dict[tuple[str, str], dict]:
    """(from part, to part) -> {'top': n, 'local': n, 'dynamic': n, 'where': {importing modules}}."""
    edges: dict[tuple[str, str], dict] = defaultdict(lambda: {"top": 0, "local": 0, "dynamic": 0, "where": set()})
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        src = part_of(module)
        for target, kind in imports_of(path, module, root):
            dst = part_of(target)
            if dst == src:
                continue
            edge = edges[(src, dst)]
            edge[kind] += 1
            edge["where"].add(module)
    return edges


def flag(src: str, dst: str) -> str:
    if (src, dst) in FORBIDDEN:
        return "FORBIDDEN"
    if src not in LAYER_OF or dst not in LAYER_OF:
        return "UNPLACED"
    return "UP" if LAYER_OF[dst] > LAYER_OF[src] else ""


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / PACKAGE).resolve()
    edges = graph(root)
    order = {part: (LAYER_OF.get(part, 99), part) for pair in edges for part in pair}
    bad = 0
    print(f"import graph of {root} (layer: 0 = bottom)\n")
    for (src, dst) in sorted(edges, key=lambda e: (order[e[0]], order[e[1]])):
        e = edges[(src, dst)]
        counts = ", ".join(f"{k} {e[k]}" for k in ("top", "local", "dynamic") if e[k])
        mark = flag(src, dst)
        bad += bool(mark)
        where = ", ".join(sorted(e["where"]))
        print(f"  {mark:<9} {src:>10} ({LAYER_OF.get(src, '?')}) -> {dst:<10} ({LAYER_OF.get(dst, '?')})  "
              f"[{counts}]  in {where}")
    print(f"\n{bad} arrow(s) against the layering" if bad else "\nno arrow goes up the layering")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
