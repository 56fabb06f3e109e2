"""What `pip install megatron-delta` gives a user: requirements that never replace the torch a
container already has, a wheel that carries every module, and a non-editable install that trains
from any folder."""

import email
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of its sources (the checkout stays untouched)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "README.md", "megatron_delta"):
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
        copy(os.path.join(REPO, name), source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True)
    (path,) = out.glob("megatron_delta-*.whl")
    return path


def _metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(archive.read(name))


def test_requirements_never_replace_an_installed_torch(wheel):
    requires = [r for r in _metadata(wheel).get_all("Requires-Dist") if "extra ==" not in r]
    assert "torch>=2.6" in requires
    assert "megatron-core<0.20,>=0.16.1" in requires
    assert not [r for r in requires if "==" in r]  # nothing pinned: a container's builds stay


def test_wheel_carries_every_module(wheel):
    package = os.path.join(REPO, "megatron_delta")
    expected = {
        os.path.relpath(os.path.join(folder, f), REPO).replace(os.sep, "/")
        for folder, _, files in os.walk(package) if "__pycache__" not in folder
        for f in files if not f.endswith(".pyc")
    }
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("megatron_delta/")}
    assert expected == shipped


def test_installed_wheel_trains_from_any_folder(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    where = subprocess.run([sys.executable, "-c", "import megatron_delta; print(megatron_delta.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))  # the installed copy, not the checkout
    config = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
    sets = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=64",
            "training.micro_batch_size=2", "training.global_batch_size=4", "training.train_iters=3",
            "training.lr_warmup_iters=1", "training.eval_iters=1", "logging.log_interval=1", "logging.tensorboard=false"]
    run = subprocess.run([sys.executable, "-m", "megatron_delta.cli", "train", "--config", config,
                          *[f"--set={s}" for s in sets]],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "done: 3 steps" in run.stdout
    assert (elsewhere / "runs" / "tiny_cpu" / "metrics.jsonl").exists()  # relative paths: the caller's folder


def import_graph() -> dict:
    """megatron_delta's modules -> the package modules each imports (at module level or inside a
    function; `from megatron_delta import NAME` of a lazy export counts as its defining module)."""
    import ast

    import megatron_delta

    package = os.path.join(REPO, "megatron_delta")
    modules = {}
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[dotted] = path
    graph = {}
    for module, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("megatron_delta"):
                imported.add(node.module)
                for alias in node.names:
                    imported.add(f"{node.module}.{alias.name}")
                    if node.module == "megatron_delta":
                        imported.add(megatron_delta._EXPORTS.get(alias.name, ""))
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[module] = {name for name in imported if name in modules and name not in (module, "megatron_delta")}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert {"megatron_delta.train", "megatron_delta.routing", "megatron_delta.kernels"} <= set(graph)
    assert "megatron_delta.kernels" in graph["megatron_delta.routing"]  # the graph sees imports

    def cycle_from(start, path):
        for module in sorted(graph[path[-1]]):
            if module == start:
                return path
            if module not in path and (found := cycle_from(start, path + [module])):
                return found
        return None

    cycles = [cycle for module in sorted(graph) if (cycle := cycle_from(module, [module]))]
    assert not cycles, " -> ".join(cycles[0] + cycles[0][:1])


def test_readme_module_map_lists_the_package():
    """The README's module map names every module (and the hf/ package) and nothing else."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    table = readme.split("## Module map", 1)[1].split("\n## ", 1)[0]
    mapped = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    package = os.path.join(REPO, "megatron_delta")
    shipped = {name + ("/" if os.path.isdir(os.path.join(package, name)) else "") for name in os.listdir(package)
               if (name.endswith(".py") and name != "__init__.py") or os.path.exists(os.path.join(package, name, "__init__.py"))}
    assert mapped == shipped
