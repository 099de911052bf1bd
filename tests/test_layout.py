"""The layout's rules, checked on the source: steel/ is split by stage and imported in one direction.

    core < data < model < {train, score} < eval < {tune, serve, report} < pipeline < api < cli

A module may import its own subpackage and any stage below it; stages on the same level (train and
score; tune, serve and report) never import each other; nothing in steel/ imports ``ray_jobs`` or
``bench``. Imports inside functions count: they are dependencies too. Importing any steel module
loads no Ray, TensorFlow, OpenCV or matplotlib (``steel.core.keras_env`` is the one door to
TensorFlow), and no module reaches into another module's ``_private`` names.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEEL = REPO / "steel"
LEVELS = {"core": 0, "data": 1, "model": 2, "train": 3, "score": 3, "eval": 4, "tune": 5, "serve": 5,
          "report": 5, "pipeline": 6, "api": 7, "cli": 8}
HEAVY = ("ray", "tensorflow", "cv2", "matplotlib")
TF_DOOR = "steel.core.keras_env"  # imports TensorFlow by design: the one place that selects tf-keras


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(STEEL.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def stage(module: str) -> str | None:
    """``steel.score.run`` -> ``score``; ``steel.pipeline`` -> ``pipeline``; ``steel`` -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every import in the file, top-level or not."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base, [a.name for a in node.names]))
    return out


def test_every_module_sits_in_a_known_stage():
    unknown = sorted({stage(m) for m in modules()} - set(LEVELS) - {None})
    assert not unknown, f"steel/ has folders or modules outside the stages {sorted(LEVELS)}: {unknown}"


def direction_violations() -> list[str]:
    found = modules()
    bad = []
    for module, path in found.items():
        own = stage(module)
        for line, target, names in imports(path, module):
            where = f"{path.relative_to(REPO)}:{line}"
            top = target.split(".")[0]
            if top in ("ray_jobs", "bench", "tests"):
                bad.append(f"{where}: {module} imports {target}")
                continue
            if top != "steel" or own is None:
                continue
            # `from steel.score import run` names the module steel.score.run
            targets = sorted({f"{target}.{n}" if f"{target}.{n}" in found else target for n in names} or {target})
            for t in targets:
                other = stage(t)
                if other is None or other == own:
                    continue
                if other not in LEVELS:
                    bad.append(f"{where}: {module} imports unknown {t}")
                elif LEVELS[other] >= LEVELS[own]:
                    bad.append(f"{where}: {own} ({LEVELS[own]}) imports {other} ({LEVELS[other]}): {t}")
    return bad


def test_imports_go_one_way():
    bad = direction_violations()
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_the_direction_check_catches_a_back_edge(tmp_path, monkeypatch):
    """The checker itself: a core module importing a scoring module is reported."""
    fake = tmp_path / "steel"
    for rel, text in {"__init__.py": "", "core/__init__.py": "", "score/__init__.py": "",
                      "core/x.py": "def f():\n    from steel.score import run\n", "score/run.py": ""}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "STEEL", fake)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert direction_violations() == ["steel/core/x.py:2: core (0) imports score (3): steel.score.run"]


def private_violations() -> list[str]:
    found = modules()
    bad = []
    for module, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> steel module it is bound to
        for line, target, names in imports(path, module):
            if target.startswith("steel") and target != module:
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        bad.append(f"{path.relative_to(REPO)}:{line}: {module} imports {target}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("steel"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in found:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("steel") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {module} uses "
                           f"{aliases[node.value.id]}.{node.attr}")
    return bad


def test_no_module_uses_another_modules_private_names():
    bad = private_violations()
    assert not bad, "private names used across modules (make them public or move them):\n" + "\n".join(bad)


@pytest.mark.timeout(120)
def test_importing_steel_loads_no_ray_tensorflow_cv2_or_matplotlib():
    names = [m for m in modules() if m != TF_DOOR]
    script = (
        "import importlib, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "    if loaded:\n"
        "        print(json.dumps([name, loaded])); break\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True, text=True,
                          cwd=REPO, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result is None, f"importing {result[0]} loads {', '.join(result[1])}"
    assert len(names) > 40  # every module of the tree was imported, not an empty list


DOTTED = __import__("re").compile(r"\bsteel\.(?:core|data|model|train|score|eval|tune|serve|report|pipeline|api|cli)"
                                  r"(?:\.[A-Za-z_][A-Za-z_0-9]*)*(?::[A-Za-z_][A-Za-z_0-9]*)?")
TEXT_GLOBS = ("README.md", "docs/*.md", "bench/README.md", "configs/**/*.yaml", "infra/**/*", "Makefile", ".ci/*",
              "pyproject.toml", "steel/**/*.py", "ray_jobs/*.py", "bench/*.py", "tests/*.py")


def unresolved_paths() -> list[str]:
    """Every dotted path into steel named in docs, configs, manifests, scripts and docstrings that does
    not import (``steel.x.y.name`` or ``steel.x.y:name``)."""
    import importlib

    bad = []
    seen: dict[str, bool] = {}
    for pattern in TEXT_GLOBS:
        for path in sorted(REPO.glob(pattern)):
            if not path.is_file() or path == Path(__file__):
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                for ref in DOTTED.findall(line):
                    if ref not in seen:
                        seen[ref] = _resolves(ref.replace(":", "."), importlib)
                    if not seen[ref]:
                        bad.append(f"{path.relative_to(REPO)}:{n}: {ref}")
    return bad


def _resolves(ref: str, importlib) -> bool:
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.timeout(120)
def test_every_dotted_path_named_in_docs_configs_and_code_resolves():
    bad = unresolved_paths()
    assert not bad, "dotted paths that do not resolve:\n" + "\n".join(bad)


def test_shared_names_are_imported_from_core_names():
    """A constant of steel.core.names imported through another module is a second definition in
    disguise (``from steel.data.rle import SHAPE``): every module takes them from steel.core.names."""
    import steel.core.names as names

    shared = {n for n in dir(names) if not n.startswith("_") and n != "annotations"}
    bad = []
    for module, path in modules().items():
        for line, target, imported in imports(path, module):
            if target.startswith("steel") and target != "steel.core.names":
                bad += [f"{path.relative_to(REPO)}:{line}: {n} from {target}" for n in imported if n in shared]
    assert not bad, "import these from steel.core.names:\n" + "\n".join(bad)
