"""The house stays walkable: no circle of imports among clipkd's modules and no import from a lower package up
into a higher one, whether at a module's top or inside a function (both are how one module leans on another).

The packages from the bottom up: ``core`` (errors, the process group, built-in datasets, precision), ``methods``
(the losses), ``selection`` (the batch selectors), ``results`` (the store), ``evals`` (the benchmarks),
``harness`` (configuration, data, models, teachers, training, runs, grids, the CLI), ``app`` (the dashboard). A
module may import its own package and those below it.
"""
import ast

from conftest import ROOT

LAYERS = ["core", "methods", "selection", "results", "evals", "harness", "app"]


def import_graph() -> dict[str, set[str]]:
    """Each module of the project's packages and the project modules it imports anywhere in its body."""
    modules = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:  # the module an imported name lives in: the longest known prefix
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[module] = {target for name in imported if (target := resolve(name)) and target != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_its_way_back_to_itself():
    assert circles(import_graph()) == []


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    layer = {package: i for i, package in enumerate(LAYERS)}
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if layer[target.split(".")[0]] > layer[module.split(".")[0]])


def test_no_package_imports_one_above_it():
    assert upward_imports(import_graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import():
    """The two checks can fail: on a graph with a circle of three and an import from core into harness."""
    graph = {"core.a": {"harness.b"}, "harness.b": {"harness.c"}, "harness.c": {"core.a"}, "harness.d": set()}
    assert circles(graph) == [["core.a", "harness.b", "harness.c"]]
    assert upward_imports(graph) == [("core.a", "harness.b")]


def test_a_package_is_its_folder_and_its_docstring():
    """A package's ``__init__`` imports nothing (``harness.cli``'s entry point aside): importing a package costs
    nothing, so a command pays only for the modules it uses (``clipkd --help``, ``grid status``)."""
    heavy = []
    for package in LAYERS:
        for init in (ROOT / package).rglob("__init__.py"):
            if init.parent.name in {"cli", "methods", "results", "migrations", "app", "views"}:
                continue  # the CLI's parser; methods' lazy names (PEP 562); results' formats; not packages of code
            tree = ast.parse(init.read_text())
            if any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body):
                heavy.append(str(init.relative_to(ROOT)))
    assert heavy == []


MAX_LINES = 440  # "about 400": a module past it holds more than one concern


def test_no_module_outgrows_one_concern():
    long = {str(path.relative_to(ROOT)): n for package in LAYERS for path in (ROOT / package).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_built_in_method_file_is_listed_and_registers_its_name():
    """``methods.BUILTIN`` is how ``import methods`` knows the built-ins without importing them: each file that
    registers a method is listed under the name it registers."""
    import methods

    registering = {}
    for path in (ROOT / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                registering[node.args[0].value] = path.stem
    assert sorted(registering) == sorted(methods.BUILTIN)
    assert all(registering[name] == name for name in methods.BUILTIN)
    assert set(methods.BUILTIN) <= set(methods.available())  # a worker's tests may register more


def test_every_folder_of_code_is_a_package():
    """A folder without ``__init__.py`` imports from a checkout but is left out of a built wheel (setuptools finds
    packages by it). Streamlit's pages and Alembic's migrations are scripts those tools load by path."""
    scripts = {"app/views", "results/migrations", "results/migrations/versions"}
    folders = {str(path.parent.relative_to(ROOT)) for package in LAYERS for path in (ROOT / package).rglob("*.py")}
    assert sorted(f for f in folders - scripts if not (ROOT / f / "__init__.py").is_file()) == []
