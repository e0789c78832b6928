"""What a reader of drpo.py meets before its definition: for each named function, the module-level names of
the file that it uses but that are defined below it, and the names it reaches in other files
(beside("eval").Watch, or outputs.Watch where outputs = beside("eval")).

    python benchmarks/reading_order.py drpo.py drpo_step train
"""
import ast
import sys


def unseen(path, function):
    """(names defined later in the file, names from other files) that function uses."""
    tree = ast.parse(open(path).read())
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            defined.update({n.id: node.lineno for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)})
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    beside = lambda n: isinstance(n, ast.Call) and getattr(n.func, "id", "") == "beside"
    aliases = {n.targets[0].id: n.value.args[0].value for n in ast.walk(fn) if isinstance(n, ast.Assign)
               and beside(n.value) and isinstance(n.targets[0], ast.Name)}
    later, other = set(), set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Name) and defined.get(n.id, 0) > fn.lineno:
            later.add(n.id)
        elif isinstance(n, ast.Attribute) and beside(n.value):
            other.add(f"{n.value.args[0].value}.{n.attr}")
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases:
            other.add(f"{aliases[n.value.id]}.{n.attr}")
    return sorted(later), sorted(other)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: python benchmarks/reading_order.py FILE FUNCTION [FUNCTION ...]")
    for function in argv[1:]:
        later, other = unseen(argv[0], function)
        print(f"{function}: {len(later) + len(other)} names before their definition: {len(later)} later in the "
              f"file ({', '.join(later)}), {len(other)} in other files ({', '.join(other)})")


if __name__ == "__main__":
    main()
