"""A non-editable install (pip install . into a folder of its own) carries what the package
needs at run time: the presets `kvserve serve --config NAME` finds, and the C++ sources
(headers included) that the CPU ops build from."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

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
    """A fresh venv with kvserve's wheel, built from a copy of the sources, installed (not
    editable); its
    dependencies come from this venv's site-packages through a plain .pth path line (which
    does not run this venv's own .pth files, so its editable kvserve stays out)."""
    source = source_copy(tmp_path_factory.mktemp("source"))
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                   capture_output=True)
    python = venv / "bin" / "python"
    wheels = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", "-w", str(wheels), str(source)]
    out = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
               *map(str, wheels.glob("kvserve-*.whl"))]
    out = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = next(p for p in map(pathlib.Path, sys.path) if p.name == "site-packages")
    (pathlib.Path(site) / "kvserve_test_deps.pth").write_text(f"{deps}\n")
    return venv, pathlib.Path(site)


def run_installed(installed, code: str, *args: str) -> subprocess.CompletedProcess:
    venv, _ = installed
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, *args] if args else [python, "-c", code],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=venv)  # not the repository: nothing is found from there


def test_presets_by_name_from_the_installed_package(installed):
    out = run_installed(installed, (
        "import server.cli as c\n"
        "engine_kwargs, _ = c.load_settings(['--config', 'cpu-lowlatency', '--max-num-seqs', '4'])\n"
        "print(c.__file__)\n"
        "print(engine_kwargs['quantization'], engine_kwargs['max_num_seqs'])\n"
        "print(' '.join(c.presets()))"))
    assert out.returncode == 0, out.stderr
    path, values, names = out.stdout.splitlines()
    assert path.startswith(str(installed[1]))
    assert values == "int4+int8 4"
    assert names.split() == ["cpu-lowlatency", "cpu-small", "gpu-default"]
    help_text = run_installed(installed, "", "-m", "server.cli", "serve", "--help").stdout
    assert "cpu-lowlatency" in help_text and "cpu-small" in help_text


def test_unknown_preset_is_a_clear_error(installed):
    out = run_installed(installed, "", "-m", "server.cli", "serve", "--config", "nope")
    assert out.returncode != 0 and "no preset 'nope'" in out.stderr and "cpu-small" in out.stderr


def test_cpu_op_sources_are_installed(installed):
    site = installed[1]
    repo_sources = {p.name for p in (REPO / "kernels" / "csrc").iterdir()}
    assert {p.name for p in (site / "kernels" / "csrc").iterdir()} >= repo_sources
    assert (site / "server" / "presets" / "cpu-small.toml").exists()
    assert (site / "server" / "static" / "playground.html").exists()


def test_installed_kvserve_serves_a_preset(installed, smol_llm, tmp_path):  # GGUF cached
    """`kvserve serve --config cpu-small` from the fresh venv's own console script: the C++
    ops build from the installed sources (in a build folder of its own, leaving the shared
    one to the other tests), the server answers, and it is gone when stopped."""
    import json

    import httpx

    from test_server import free_port

    venv, _ = installed
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    proc = subprocess.Popen([str(venv / "bin" / "kvserve"), "serve", "--config", "cpu-small",
                             "--port", str(port), "--grpc-port", str(grpc_port),
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=venv)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(360):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(base + "/v1/completions", timeout=60, json={
            "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        assert "kvserve playground" in httpx.get(base + "/").text
        import tritonclient.grpc as grpcclient  # gRPC from the installed stubs

        assert grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_ready()
        info = subprocess.run([str(venv / "bin" / "kvserve"), "info", "--json"], env=env,
                              capture_output=True, text=True, timeout=300, cwd=venv)
        assert json.loads(info.stdout)["cpu_ops"]["built"] is True, info.stderr[-2000:]
    finally:
        proc.terminate()  # uvicorn stops gracefully, then re-raises the SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
