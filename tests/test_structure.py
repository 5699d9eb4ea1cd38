"""The package's import structure: layers from the textbook up to the command line, no cycles.

Every module of frcnn_scratch (and kernels/, installed as frcnn_scratch.kernels) is parsed, and each
import it makes, at its top or inside a function, is an edge of the graph.  A module may import
modules of its own layer or of layers below it, never above; the graph has no cycle.  The
package's own __init__ (the names of `import frcnn_scratch as fr`) sits above the model; the edge
Python adds from a submodule to the packages around it is not counted.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "frcnn_scratch"

# Bottom to top.  An entry "x" is the module frcnn_scratch.x; "x/" is the package x and every
# module in it.
LAYERS = [
    ("_checks",),
    ("nn",),                                        # the textbook layers: numpy only
    ("boxes", "box_coding", "anchors", "losses", "nms", "roi_pool", "roi_align", "rescale"),
    ("ops", "_triton_bridge", "kernels/"),          # the backend switch and the Triton kernels
    ("labeling",),                                  # anchor IoU through ops.box_iou (the backend)
    ("rpn",),
    ("roi_head",),
    ("config",),
    ("fast/",),                                     # nn, stages and config; never model and above
    ("memory",),
    ("checkpoint",),
    ("model",),                                     # never data/
    ("",),                                          # frcnn_scratch/__init__.py
    ("data/",),
    ("evaluate",),
    ("train",),
    ("viz",),
    ("exercises",),
    ("tools/",),
    ("cli",),
]

# Modules cli.py may import inside a function (each for a heavy optional dependency: torch,
# triton, torchvision, or the kernels, which load triton); everything else at its top.
CLI_LAZY = ("torch", "triton", "torchvision", f"{PACKAGE}.kernels",
            f"{PACKAGE}.tools.compile_report")


def module_files():
    """{module name: path} of frcnn_scratch/**.py and kernels/**.py (as frcnn_scratch.kernels)."""
    files = {}
    for folder, name in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


FILES = module_files()


def imports(name, path):
    """[(imported module, line, inside a function)] of one module; an internal `from X import y`
    counts as an import of X.y when X.y is a module, else of X."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[:len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module
                for alias in child.names:
                    full = f"{module}.{alias.name}"
                    found.append((full if full in FILES else module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def internal(module):
    """The frcnn_scratch module an import loads (its longest known prefix), or None."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in FILES:
            return ".".join(parts[:k])
    return None


GRAPH = {name: {(internal(m), line) for m, line, _ in imports(name, path) if internal(m)}
         for name, path in FILES.items()}


def layer_of(module):
    """The index in LAYERS of a frcnn_scratch module (None: not placed)."""
    short = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    for level, entries in enumerate(LAYERS):
        for entry in entries:
            if entry.endswith("/"):
                if short == entry[:-1] or short.startswith(entry[:-1] + "."):
                    return level
            elif short == entry:
                return level
    return None


def show(module):
    return module[len(PACKAGE) + 1:] or "frcnn_scratch/__init__"


def test_every_module_has_a_layer():
    unplaced = [show(m) for m in FILES if layer_of(m) is None]
    assert not unplaced, f"modules missing from LAYERS in {__file__}: {unplaced}"


def test_no_import_goes_up_the_layers():
    upward = []
    for module, edges in GRAPH.items():
        for target, line in sorted(edges):
            if layer_of(module) is not None and layer_of(target) is not None \
                    and layer_of(target) > layer_of(module):
                upward.append(f"{show(module)} (line {line}) imports {show(target)}, a higher layer")
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    """Depth-first search; a cycle is reported as the chain of modules that closes it."""
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target, _ in sorted(GRAPH[module]):
            if target == module:
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(show(m) for m in stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_function_local_imports():
    """The parser's own check: cli's lazy import of compile_report is an edge."""
    assert (f"{PACKAGE}.tools.compile_report" in
            {target for target, _ in GRAPH[f"{PACKAGE}.cli"]})


def test_nn_imports_numpy_and_the_standard_library_only():
    outside = sorted({m for m, _, _ in imports(f"{PACKAGE}.nn", FILES[f"{PACKAGE}.nn"])
                      if m.split(".")[0] not in sys.stdlib_module_names | {"numpy"}})
    assert not outside, f"nn.py imports {outside}"


@pytest.mark.parametrize("part", ["fast", "model"])
def test_the_speed_work_and_the_model_stay_below_the_data_and_the_tools(part):
    """fast/ never imports model, train, cli, data or tools; model never imports data."""
    banned = {"fast": ("model", "train", "cli", "data", "tools", "evaluate"),
              "model": ("data", "train", "cli", "tools", "evaluate")}[part]
    found = [f"{show(m)} imports {show(t)}" for m, edges in GRAPH.items()
             if show(m) == part or show(m).startswith(part + ".")
             for t, _ in edges if show(t).split(".")[0] in banned]
    assert not found, found


def test_cli_imports_at_its_top_but_the_heavy_optional_dependencies():
    lazy = [(m, line) for m, line, in_function in imports(f"{PACKAGE}.cli", FILES[f"{PACKAGE}.cli"])
            if in_function and not any(m == name or m.startswith(name + ".") for name in CLI_LAZY)]
    assert not lazy, f"cli.py imports inside functions what it could import at its top: {lazy}"


def test_importing_the_command_loads_no_torch_triton_or_kernels():
    """`frcnn --help` stays fast: torch, triton, torchvision and the kernels load only when a
    command needs them."""
    code = ("import sys, frcnn_scratch.cli; print(' '.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'triton', 'torchvision') "
            "or m.startswith('frcnn_scratch.kernels'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing frcnn_scratch.cli loaded {done.stdout.strip()}"
