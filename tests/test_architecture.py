"""The house's layering, read from the source: no import cycle between the top-level packages (runtime,
edge_client, cloud_server, export, simulation, benchmarks), runtime/ imports neither side, and only the
simulation, which hosts both, imports the server and the device. Every import counts,
at module level or inside a function (a lazy import is still a dependency), as does
importlib.import_module("fedafd....") with a literal name."""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
"""fedafd.<package>[.<sub>] -> its folder, as the wheel maps them."""
TOP = sorted({name.split(".")[1] for name in PACKAGE_DIRS})

Edge = tuple[str, str]  # (importing package, imported package)


def _module_name(path: Path) -> str:
    """runtime/data/modal.py -> fedafd.runtime.data.modal (an __init__.py names its package)."""
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return "fedafd." + ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module name `tree` imports, with its line: import / from-import anywhere (relative ones
    resolved against `module`), and importlib.import_module with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]  # `from . import codecs`
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def package_imports() -> dict[Edge, list[str]]:
    """(package, package it imports) -> where ("path:line"), for every import across two top-level packages."""
    edges: dict[Edge, list[str]] = defaultdict(list)
    for name, folder in PACKAGE_DIRS.items():
        if name.count(".") != 1:  # subpackages are walked with their top-level folder
            continue
        source = name.split(".")[1]
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for target, line in _imported(tree, module, path.name == "__init__.py"):
                parts = target.split(".")
                where = f"{path.relative_to(ROOT)}:{line}"
                if (len(parts) >= 2 and parts[0] == "fedafd" and parts[1] in TOP and parts[1] != source
                        and where not in edges[(source, parts[1])]):
                    edges[(source, parts[1])].append(where)
    return dict(edges)


def cycles(edges: dict[Edge, list[str]]) -> list[list[str]]:
    """Every elementary cycle of the package graph, each as the packages along it (first one repeated)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(path + [start])
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest package
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_the_walk_sees_every_package_and_the_imports_it_must() -> None:
    # The walk itself: all six packages, and known imports at module level and inside functions.
    edges = package_imports()
    assert TOP == ["benchmarks", "cloud_server", "edge_client", "export", "runtime", "simulation"]
    assert ("cloud_server", "runtime") in edges and ("edge_client", "runtime") in edges
    # The simulation hosts both sides, and is the one package that imports both.
    assert ("simulation", "cloud_server") in edges and ("simulation", "edge_client") in edges
    assert any(where.startswith("export/") for where in edges[("export", "edge_client")])
    assert ("benchmarks", "export") in edges  # only inside functions (benchmarks/latency.py)


def test_no_import_cycle_between_the_top_level_packages() -> None:
    edges = package_imports()
    found = cycles(edges)
    described = ["  " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a} -> {b} at {', '.join(edges[(a, b)][:3])}" for a, b in zip(cycle, cycle[1:])) for cycle in found]
    assert not found, "import cycles between packages:\n" + "\n".join(described)


def test_runtime_imports_neither_side() -> None:
    edges = package_imports()
    for side in ("cloud_server", "edge_client", "export", "benchmarks", "simulation"):
        assert ("runtime", side) not in edges, f"runtime imports {side} at {edges[('runtime', side)]}"


def test_the_server_and_the_device_meet_only_on_the_wire() -> None:
    edges = package_imports()
    for a, b in (("cloud_server", "edge_client"), ("edge_client", "cloud_server"), ("cloud_server", "simulation"),
                 ("edge_client", "simulation")):
        assert (a, b) not in edges, f"{a} imports {b} at {edges[(a, b)]}"


def test_a_cycle_is_found_and_named() -> None:
    # The detector on a made-up graph: a -> b -> c -> a and d -> a.
    edges = {("a", "b"): ["a.py:1"], ("b", "c"): ["b.py:2"], ("c", "a"): ["c.py:3"], ("d", "a"): ["d.py:4"]}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({("a", "b"): [], ("b", "c"): []}) == []


def module_imports() -> dict[Edge, list[str]]:
    """(module, module it imports) -> where, for imports between two modules of the same top-level package
    (a package's __init__ counts as a module)."""
    known = set()
    trees = {}
    for name, folder in PACKAGE_DIRS.items():
        if name.count(".") != 1:
            continue
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = _module_name(path)
            known.add(module)
            trees[module] = (path, ast.parse(path.read_text(), filename=str(path)))
    edges: dict[Edge, list[str]] = defaultdict(list)
    for module, (path, tree) in trees.items():
        top = module.split(".")[1]
        for target, line in _imported(tree, module, path.name == "__init__.py"):
            # `from fedafd.x.y import name` names a module when fedafd.x.y.name is one, else fedafd.x.y
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and target.split(".")[1] == top and not module.startswith(target + "."):
                where = f"{path.relative_to(ROOT)}:{line}"
                if where not in edges[(module, target)]:
                    edges[(module, target)].append(where)
    return dict(edges)


def test_no_import_cycle_between_the_modules_of_a_package() -> None:
    edges = module_imports()
    assert ("fedafd.edge_client.objectives.fedafd", "fedafd.edge_client.training") in edges  # the walk sees them
    found = cycles(edges)
    described = ["  " + " -> ".join(cycle) for cycle in found]
    assert not found, "import cycles between modules:\n" + "\n".join(described)


def switch_lists(tree: ast.AST, switches: set[str]) -> list[tuple[int, list[str]]]:
    """(line, names) of every class, dict literal or call in `tree` that spells out most of the method switches
    (a config or a strategy naming the few it sets is not a second list)."""
    found = []
    for node in ast.walk(tree):
        # The configs (runtime/config.py) are what a user sets, FedAFD's knobs among them, not the device's list.
        if isinstance(node, ast.ClassDef) and node.name not in ("MethodSettings", "ServerConfig", "ClientConfig"):
            named = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        elif isinstance(node, ast.Dict):
            named = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        elif isinstance(node, ast.Call):
            named = {k.arg for k in node.keywords if k.arg}
        else:
            continue
        if len(named & switches) > len(switches) // 2:
            found.append((node.lineno, sorted(named & switches)))
    return found


def test_the_method_switches_are_defined_once() -> None:
    """MethodSettings is the one list of the method's switches and their defaults: no other class, dict or call
    spells most of them out (as the all-off dict, RoundPlan and the device's field-by-field copy once did)."""
    import dataclasses

    from fedafd.runtime.methods import MethodSettings

    switches = {f.name for f in dataclasses.fields(MethodSettings)} - {"strategy"}
    old_all_off = ast.parse("base = dict(strategy='x', uplink=True, feature_codec='fp32', local_init='random', baa=False, "
                            "beta=0.0, real_label=1.0, gff=False, digest='none', digest_weight=0.0, "
                            "contrast_weight=0.0, contrast_temperature=1.0, infiltration_weight=0.0, dominant_modality='text')")
    assert switch_lists(old_all_off, switches), "the check must find a second list"
    found = []
    for name, folder in PACKAGE_DIRS.items():
        if name.count(".") != 1:
            continue
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, names in switch_lists(ast.parse(path.read_text(), filename=str(path)), switches):
                found.append(f"{path.relative_to(ROOT)}:{line}: {names}")
    assert not found, "a second definition of the method switches:\n" + "\n".join(found)


def test_export_reads_both_sides_models_and_neither_side_imports_export() -> None:
    """The rule for export/: it turns the device's model (edge_client) and the server's towers (cloud_server) into
    graphs, so it may import both; neither side, nor runtime, ever imports export (a device that trains does not
    need the exporter, and the server none of it)."""
    edges = package_imports()
    assert ("export", "edge_client") in edges and ("export", "cloud_server") in edges  # the walk sees both
    for side in ("runtime", "edge_client", "cloud_server"):
        assert (side, "export") not in edges, f"{side} imports export at {edges[(side, 'export')]}"


VOCABULARY = {"MODALITIES", "MODALITIES_OF_KIND", "CLIENT_KINDS", "other_modality"}


def test_the_shared_vocabulary_is_imported_from_its_own_module_not_the_wire() -> None:
    found = []
    for name, folder in PACKAGE_DIRS.items():
        if name.count(".") != 1:
            continue
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (isinstance(node, ast.ImportFrom) and node.module in ("fedafd.runtime.wire", "wire")
                        and {a.name for a in node.names} & VOCABULARY):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "the vocabulary imported from runtime.wire (use runtime.vocabulary):\n" + "\n".join(found)
