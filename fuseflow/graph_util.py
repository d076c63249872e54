"""Small GraphDef helpers shared by the pipeline stages."""

from __future__ import annotations

from collections.abc import Collection, Iterable


def node_name(tensor_or_input: str) -> str:
    """'^a', 'a:1', 'a' -> 'a'."""
    return tensor_or_input.lstrip("^").split(":")[0]


def output_index(tensor_or_input: str) -> int:
    """'a:1' -> 1, 'a' -> 0."""
    parts = tensor_or_input.split(":")
    return int(parts[1]) if len(parts) > 1 else 0


def is_control(input_name: str) -> bool:
    return input_name.startswith("^")


def tensor_name(tensor_or_input: str) -> str:
    """Canonical 'node:index' form."""
    return f"{node_name(tensor_or_input)}:{output_index(tensor_or_input)}"


def called_functions(attr_values: Iterable) -> list[str]:
    """Names of functions referenced by a node's (or FunctionDef node's) attrs."""
    names = []
    for value in attr_values:
        if value.HasField("func"):
            names.append(value.func.name)
        elif value.HasField("list"):
            names += [f.name for f in value.list.func]
    return names


def copy_called_functions(graph_def, nodes, out) -> None:
    """Copy into out.library the functions nodes call, and those they call in turn."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    have = {f.signature.name for f in out.library.function}
    stack = [f for n in nodes for f in called_functions(n.attr.values())]
    while stack:
        name = stack.pop()
        if name in have or name not in functions:
            continue
        have.add(name)
        out.library.function.add().CopyFrom(functions[name])
        for n in functions[name].node_def:
            stack += called_functions(n.attr.values())


def body_nodes(graph_def, node) -> list:
    """Every NodeDef in the functions node calls, recursively (a loop's cond and body)."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    seen, found = set(), []
    stack = called_functions(node.attr.values())
    while stack:
        name = stack.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        for n in functions[name].node_def:
            found.append(n)
            stack += called_functions(n.attr.values())
    return found


# Nodes that hold or pass data but compute nothing; never counted as ops.
NON_COMPUTE_OPS = frozenset({"Const", "Placeholder", "PlaceholderWithDefault", "NoOp", "_Arg",
                             "_Retval", "VarHandleOp", "VariableV2"})


def count_ops(graph_def, only: Collection[str] | None = None) -> int:
    """Computing ops as a user thinks of them, with calls, loops and conditionals counted
    by their bodies; only: count just these nodes."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    memo: dict[str, int] = {}

    def body_count(name: str) -> int:
        if name not in memo:
            memo[name] = 0  # guards against recursion
            fdef = functions[name]
            memo[name] = sum((n.op not in NON_COMPUTE_OPS) + sum(
                body_count(f) for f in called_functions(n.attr.values()) if f in functions)
                for n in fdef.node_def)
        return memo[name]

    total = 0
    for node in graph_def.node:
        if only is not None and node.name not in only:
            continue
        calls = [f for f in called_functions(node.attr.values()) if f in functions]
        total += sum(body_count(f) for f in calls) if calls else node.op not in NON_COMPUTE_OPS
    return total
