"""The longest functions of the given modules (lines, name): ``python scripts/longest_functions.py FILE…``."""

import ast
import sys


def lengths(path: str) -> list[tuple[int, str]]:
    tree = ast.parse(open(path).read())
    return sorted(
        ((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}") for node in ast.walk(tree)
         if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)),
        reverse=True,
    )  # fmt: skip


if __name__ == "__main__":
    for path in sys.argv[1:]:
        for length, name in lengths(path)[:3]:
            print(f"{length:5d}  {name}")
