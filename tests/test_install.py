"""hcd installs and imports as `hcd.engine` / `hcd.kernels`, beside another top-level `kernels` package
(Hugging Face's kernel hub has that name), and runs from a plain checkout with nothing installed.

Each check runs a fresh `python -S` with the site-packages folder on PYTHONPATH: -S skips the .pth files, so
this session's editable install of hcd is invisible and only the folder under test can provide `hcd`."""
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = site.getsitepackages()[0]


def _python(code: str, path: Path, cwd: Path) -> str:
    env = {"PYTHONPATH": f"{path}:{SITE}", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _pip_install(project: Path, target: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(target), str(project)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_plain_checkout_imports_hcd_packages(tmp_path):
    out = _python("import hcd.kernels, hcd.engine.cli, hcd.engine.trainer\n"
                  "print(hcd.kernels.__file__); print(hcd.engine.trainer.__file__)", ROOT, tmp_path)
    assert out.split() == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "engine" / "trainer.py")]


def test_install_beside_another_top_level_kernels_package(tmp_path):
    standin = tmp_path / "standin"
    (standin / "kernels").mkdir(parents=True)
    (standin / "kernels" / "__init__.py").write_text("WHO = 'the other kernels package'\n")
    (standin / "kernels" / "hub.py").write_text("def get_kernel(name):\n    return name\n")
    (standin / "setup.py").write_text("from setuptools import setup\n"
                                      "setup(name='kernels', version='0.0.1', packages=['kernels'])\n")
    project = tmp_path / "hcd-src"  # a copy: building in the checkout would leave build/ and egg-info there
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("hcd", "engine", "kernels"):
        shutil.copytree(ROOT / folder, project / folder, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, project / name)
    target = tmp_path / "site"
    _pip_install(standin, target)
    _pip_install(project, target)  # must not write into target/kernels

    out = _python("import kernels, kernels.hub, hcd.kernels, hcd.engine.cli\n"
                  "from hcd.kernels import hcd_head_loss, student_loss, HCDLossConfig\n"
                  "print(kernels.WHO); print(hcd.kernels.__file__); print(hcd.engine.cli.__file__)",
                  target, tmp_path)
    who, hcd_kernels, cli = out.strip().splitlines()
    assert who == "the other kernels package"
    assert Path(hcd_kernels) == target / "hcd" / "kernels" / "__init__.py"
    assert Path(cli) == target / "hcd" / "engine" / "cli.py"
    assert sorted(p.name for p in (target / "kernels").iterdir() if p.suffix == ".py") == ["__init__.py", "hub.py"]


def test_no_module_imports_the_bare_top_level_names():
    import re
    bare = re.compile(r"^\s*(from|import)\s+(engine|kernels)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("hcd", "engine", "kernels", "tests", "bench")
                 for p in (ROOT / folder).rglob("*.py") if bare.search(p.read_text())]
    assert offenders == []
