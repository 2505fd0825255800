"""What `pip install .` puts into site-packages: one `hart` package, nothing top-level beside it."""
import shutil
import subprocess
import sys
import zipfile

from tests.utils import REPO_ROOT


def test_wheel_installs_only_the_hart_package(tmp_path):
    # The wheel is what `pip install .` unpacks into site-packages: its top-level names are the result.
    # Built from a copy, so that the build's own folders (build/, *.egg-info) stay out of the repository.
    source = tmp_path / "source"
    for name in ("hart", "pipelines", "app"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("hart-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"hart"}, f"the wheel installs top-level packages {sorted(top)}"
    for inside in ("hart/pipelines/__init__.py", "hart/pipelines/pipeline_hart.py", "hart/app/__main__.py",
                   "hart/app/demo.py", "hart/bundled/shapes-128/model_index.json",
                   "hart/bundled/shapes-128/transformer/diffusion_pytorch_model.safetensors"):
        assert inside in names, f"{inside} is missing from the wheel"
    assert not any(n.startswith("hart/tests") or "/fixtures/" in n for n in names), "test data in the wheel"
