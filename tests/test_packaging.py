"""A non-editable install (pip install . into a folder of its own) carries what the package
needs at run time: the presets `kvserve serve --config NAME` finds, and the C++ sources
(headers included) that the CPU ops build from."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def source_copy(dest: pathlib.Path) -> pathlib.Path:
    """The project's files as git sees them (no build/ left over from another build)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        src, dst = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    source = source_copy(tmp_path_factory.mktemp("source"))
    target = tmp_path_factory.mktemp("site")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return target


def run_installed(target, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *args] if args else [sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=target.parent)  # not the repository: nothing found from there


def test_presets_by_name_from_the_installed_package(installed):
    out = run_installed(installed, (
        "import server.cli as c\n"
        "engine_kwargs, _ = c.load_settings(['--config', 'cpu-lowlatency', '--max-num-seqs', '4'])\n"
        "print(c.__file__)\n"
        "print(engine_kwargs['quantization'], engine_kwargs['max_num_seqs'])\n"
        "print(' '.join(c.presets()))"))
    assert out.returncode == 0, out.stderr
    path, values, names = out.stdout.splitlines()
    assert path.startswith(str(installed))
    assert values == "int4+int8 4"
    assert names.split() == ["cpu-lowlatency", "cpu-small", "gpu-default"]
    help_text = run_installed(installed, "", "-m", "server.cli", "serve", "--help").stdout
    assert "cpu-lowlatency" in help_text and "cpu-small" in help_text


def test_unknown_preset_is_a_clear_error(installed):
    out = run_installed(installed, "", "-m", "server.cli", "serve", "--config", "nope")
    assert out.returncode != 0 and "no preset 'nope'" in out.stderr and "cpu-small" in out.stderr


def test_cpu_op_sources_are_installed(installed):
    repo_sources = {p.name for p in (REPO / "kernels" / "csrc").iterdir()}
    assert {p.name for p in (installed / "kernels" / "csrc").iterdir()} >= repo_sources
    assert (installed / "server" / "presets" / "cpu-small.toml").exists()
    assert (installed / "server" / "static" / "playground.html").exists()
