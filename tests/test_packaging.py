"""The distribution: its metadata, the sdist, the wheel, and the wheel installed in a fresh virtual environment.

The wheel is built from this tree with ``pip wheel --no-build-isolation``; its native build
reuses the incremental CMake tree in ``build/native-*`` left by the set-up, so it costs
seconds. It is installed with ``--no-index`` into a new virtual environment whose only
view of this environment is a path entry to its site-packages (torch is neither downloaded
nor copied, and dependencies that this environment lacks make the install fail). The
editable install of this repository is not active there: ``.pth`` files of an appended path
are not processed, so ``spanet`` and ``spanet_ops`` come from the wheel. The installed
package is then used from a directory outside the repository: it imports, reports its
kernels, runs the README's operator example, computes a model's logits equal to this
tree's, and its console scripts start.
"""
import ast
import email
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import spanet
import spanet_ops
import timm

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "spanet-spectral"
PACKAGES = ("spanet", "spanet_ops")
CONSOLE_SCRIPTS = {
    "spanet-train": "spanet.train:main",
    "spanet-validate": "spanet.validate:main",
    "spanet-bench": "spanet.bench:main",
    "spanet-analyze": "spanet.analysis.cli:main",
    "spanet-dense": "spanet.dense.cli:main",
}
#: Imports that need not be declared, and why.
UNDECLARED_IMPORTS = {
    "triton": "ships with the CUDA builds of torch; spanet_ops.triton is imported only where it imports "
              "(spanet_ops/backends.py)",
}
#: A one-block-per-stage SPANet: cheap to build, the published stage layout.
TINY = dict(depths=(1, 1, 1, 1), dims=(24, 48, 96, 192), num_classes=5)


def _project_files(*tops: str):
    """Files of the project under ``tops`` (relative posix paths): git's tracked and
    not-ignored files where this is a git work tree, else the file system minus caches."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "--", *tops],
            check=True, capture_output=True, text=True,
        ).stdout.split("\n")
        return sorted({f for f in out if f and (ROOT / f).is_file()})
    except (OSError, subprocess.CalledProcessError):
        found = []
        for top in tops:
            for path in (ROOT / top).rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".so"):
                    found.append(path.relative_to(ROOT).as_posix())
        return sorted(found)


def _run(cmd, **kwargs):
    """Run ``cmd``; on failure, fail the test with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _clean_build_copies():
    """Drop setuptools' copy trees and egg-info (a file deleted from the sources would linger
    there and slip into the wheel); the native CMake trees in build/native-* stay."""
    for path in list((ROOT / "build").glob("lib.*")) + list((ROOT / "build").glob("bdist.*")):
        shutil.rmtree(path, ignore_errors=True)
    for path in ROOT.glob("*.egg-info"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _clean_build_copies()
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "--wheel-dir", str(out), str(ROOT)])
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
         cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def wheel(dist_dir):
    (path,) = dist_dir.glob("spanet_spectral-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(zf.read(name))


def _requirements(meta):
    """``{extra or "": [Requirement, ...]}`` from a METADATA's Requires-Dist lines."""
    groups = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extra = ""
        if req.marker is not None:
            match = re.search(r'extra == "([^"]+)"', str(req.marker))
            extra = match.group(1) if match else ""
        groups.setdefault(extra, []).append(req)
    return groups


def test_one_version_everywhere():
    cff = (ROOT / "CITATION.cff").read_text()
    assert spanet.__version__ == spanet_ops.__version__
    assert re.search(r"^version: (\S+)$", cff, flags=re.M).group(1) == spanet.__version__


def test_wheel_metadata(wheel, wheel_metadata):
    meta = wheel_metadata
    assert meta["Name"] == DIST_NAME
    assert meta["Version"] == spanet.__version__
    assert wheel.name.startswith(f"spanet_spectral-{spanet.__version__}-")
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload(decode=True).decode("utf-8").strip() == (ROOT / "README.md").read_text().strip()
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls["Paper"] == "https://arxiv.org/abs/2308.11568"
    assert urls["Official implementation"] == "https://github.com/DoranLyong/SPANet-official"
    assert set(meta.get_all("Provides-Extra")) >= {"onnx", "test", "dev"}
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(name).decode()
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", entry_points.split("[console_scripts]")[1], flags=re.M))
    assert scripts == CONSOLE_SCRIPTS


def test_wheel_holds_every_package_file_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    info = {n for n in names if ".dist-info/" in n}
    native = {n for n in names if re.fullmatch(r"spanet_ops/_C\..*\.so", n)}
    expected = set(_project_files(*PACKAGES))
    assert not expected - names, f"the wheel leaves out {sorted(expected - names)}"
    assert not names - expected - info - native, f"the wheel holds stray files {sorted(names - expected - info - native)}"
    if os.environ.get("SPANET_BUILD_NATIVE", "1") != "0":
        assert len(native) == 1, "the wheel has no native extension"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in info)


def test_sdist_holds_what_the_build_needs(dist_dir):
    (sdist,) = dist_dir.glob("spanet_spectral-*.tar.gz")
    with tarfile.open(sdist) as tf:
        top = f"spanet_spectral-{spanet.__version__}/"
        names = {m.name[len(top):] for m in tf.getmembers() if m.isfile()}
    needed = set(_project_files(*PACKAGES, "csrc")) | {
        "setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "CITATION.cff", "MANIFEST.in",
    }
    assert not needed - names, f"the sdist leaves out {sorted(needed - names)}"
    assert not any(n.endswith((".so", ".pyc")) for n in names)


def _imports(path: Path):
    """``(top-level module, at module level and unguarded)`` for each absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_function, guarded):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function = True
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, in_function, guarded)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], not (in_function or guarded)) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], not (in_function or guarded)))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function, guarded)

    visit(tree, False, False)
    return found


def test_requirements_are_what_the_code_imports(wheel_metadata):
    """Module-level imports need a base requirement; imports inside functions need a base or
    extra one (optional features); guarded imports (``except ImportError``) may be undeclared."""
    groups = _requirements(wheel_metadata)
    base = {canonicalize_name(r.name) for r in groups[""]}
    declared = {canonicalize_name(r.name) for reqs in groups.values() for r in reqs}
    distributions = metadata.packages_distributions()
    own = set(PACKAGES)
    imported = set()
    for rel in _project_files(*PACKAGES):
        if not rel.endswith(".py"):
            continue
        for module, module_level in _imports(ROOT / rel):
            if module in own or module in sys.stdlib_module_names or module in UNDECLARED_IMPORTS:
                continue
            dists = distributions.get(module)
            if dists is None:
                continue  # not installed here: only guarded imports get this far (a hard one fails elsewhere)
            dist = canonicalize_name(dists[0])
            imported.add(dist)
            if module_level:
                assert dist in base, f"{rel} imports {module} at module level: {dist} must be a base requirement"
            else:
                assert dist in declared, f"{rel} imports {module}: declare {dist} (base or an extra)"
    unused = base - imported
    assert not unused, f"base requirements that no package module imports: {sorted(unused)}"


def test_tested_versions_lie_inside_the_declared_ranges(wheel_metadata):
    """This environment (the CI's) and requirements.txt's pins satisfy every declared range."""
    pins = dict(
        (canonicalize_name(m.group(1)), m.group(2))
        for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), flags=re.M)
    )
    for extra, reqs in _requirements(wheel_metadata).items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name == DIST_NAME:
                continue  # an extra including another extra
            try:
                installed = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                pytest.fail(f"{req} ({extra or 'base'}) is not installed in the test environment")
            assert req.specifier.contains(installed, prereleases=True), f"installed {req.name} {installed} is outside {req}"
            if name in pins:
                assert req.specifier.contains(pins[name], prereleases=True), f"requirements.txt pins {name}=={pins[name]}, outside {req}"


def test_build_requirements_admit_the_pinned_tools():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), flags=re.M))
    for line in project["build-system"]["requires"]:
        req = Requirement(line)
        pinned = pins.get(req.name) or metadata.version(req.name)
        assert req.specifier.contains(pinned), f"build requirement {req} excludes the tested {req.name} {pinned}"


def test_sources_parse_as_the_oldest_supported_python():
    oldest = tuple(int(p) for p in re.search(r"requires-python = \">=(\d+)\.(\d+)\"",
                                             (ROOT / "pyproject.toml").read_text()).groups())
    for rel in _project_files(*PACKAGES):
        if rel.endswith(".py"):
            ast.parse((ROOT / rel).read_text(), filename=rel, feature_version=oldest)


def test_readme_bibtex_matches_citation_cff():
    readme = (ROOT / "README.md").read_text()
    (bibtex,) = re.findall(r"```bibtex\n(.*?)```", readme, flags=re.S)
    cff = (ROOT / "CITATION.cff").read_text()
    cited = cff[cff.index("preferred-citation:"):]
    family = re.findall(r"family-names: (.+)", cited)
    given = re.findall(r"given-names: (.+)", cited)
    authors = " and ".join(f"{f}, {g}" for f, g in zip(family, given))
    assert re.search(r"author\s*=\s*\{" + re.escape(authors) + r"\}", bibtex)
    title = re.search(r'title: "(.+)"', cited).group(1)
    assert re.search(r"title\s*=\s*\{\{?" + re.escape(title) + r"\}?\}", bibtex)
    start, end = re.search(r"start: (\d+)", cited).group(1), re.search(r"end: (\d+)", cited).group(1)
    assert re.search(rf"pages\s*=\s*\{{{start}--{end}\}}", bibtex)
    assert re.search(r"year\s*=\s*\{2023\}", bibtex)
    doi = re.search(r'doi: "(.+)"', cited).group(1)
    assert re.search(r"doi\s*=\s*\{" + re.escape(doi) + r"\}", bibtex)


#: Run by the fresh environment's interpreter from a directory outside the repository.
SMOKE = r'''
import json, os, sys
from importlib import metadata
import torch
torch.set_num_threads(1)
import spanet, spanet_ops, timm

prefix = os.path.realpath(sys.prefix) + os.sep
for module in (spanet, spanet_ops):
    assert os.path.realpath(module.__file__).startswith(prefix), f"{module.__name__} from {module.__file__}"
version = metadata.version("spanet-spectral")
assert version == spanet.__version__ == spanet_ops.__version__, (version, spanet.__version__, spanet_ops.__version__)

exec(compile(open(sys.argv[1]).read(), "README operator example", "exec"), {"__name__": "__readme__"})

work = sys.argv[2]
model = timm.create_model("spanet_small", **json.load(open(os.path.join(work, "model_args.json")))).eval()
model.load_state_dict(torch.load(os.path.join(work, "weights.pth"), weights_only=True))
with torch.inference_mode():
    logits = model(torch.load(os.path.join(work, "input.pth"), weights_only=True))
torch.save(logits, os.path.join(work, "logits.pth"))

scripts = {ep.name: ep for ep in metadata.distribution("spanet-spectral").entry_points if ep.group == "console_scripts"}
for ep in scripts.values():
    assert callable(ep.load()), ep
json.dump({"backends": spanet_ops.backends(), "scripts": sorted(scripts)}, open(os.path.join(work, "report.json"), "w"))
'''


def _operator_example():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The operators"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_wheel_installs_and_runs_in_a_fresh_environment(wheel, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "test_environment.pth").write_text("\n".join(sorted(here)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-input", str(wheel)])

    torch.manual_seed(0)
    model = timm.create_model("spanet_small", **TINY).eval()
    x = torch.randn(2, 3, 40, 36)
    with torch.inference_mode():
        expected = model(x)
    (work / "model_args.json").write_text(json.dumps(TINY))
    torch.save(model.state_dict(), work / "weights.pth")
    torch.save(x, work / "input.pth")
    (work / "operators.py").write_text(_operator_example())
    (work / "smoke.py").write_text(SMOKE)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "SPANET_DISABLE_NATIVE")}
    env["OMP_NUM_THREADS"] = "1"
    _run([str(python), str(work / "smoke.py"), str(work / "operators.py"), str(work)], cwd=work, env=env)

    report = json.loads((work / "report.json").read_text())
    assert report["scripts"] == sorted(CONSOLE_SCRIPTS)
    with zipfile.ZipFile(wheel) as zf:
        has_native = any(re.fullmatch(r"spanet_ops/_C\..*\.so", n) for n in zf.namelist())
    assert report["backends"]["native_cpu"]["available"] is has_native, report["backends"]["native_cpu"]
    here_report = spanet_ops.backends()
    if has_native and here_report["native_cpu"]["available"]:
        # Built from the same tree with the same settings as the development install.
        assert report["backends"] == json.loads(json.dumps(here_report))
    # Same code, same kernels, one thread each: float32 logits agree to rounding.
    torch.testing.assert_close(torch.load(work / "logits.pth", weights_only=True), expected, atol=1e-6, rtol=1e-5)

    # The console-script wrappers start (their modules import in the installed package).
    out = _run([str(venv / "bin" / "spanet-bench"), "--help"], cwd=work, env=env).stdout
    assert out.startswith("usage: spanet-bench")
