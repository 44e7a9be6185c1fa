"""Pack the Python packages the GPU check needs and the GPU machine's image lacks, for a machine
without network access: Ray (without its Java jars, web UI, Serve, RLlib and LLM parts: 79 MB of wheel
otherwise, over a 64 MiB transfer limit), DeepSpeed (copied from this environment: pure Python),
pydantic, jsonschema and their small dependencies, as one `site.tar.xz` for CPython 3.12 x86-64.

  python -m gammaray.app.benchmarks.gpu_bundle .gpu-bundle          # here (needs PyPI)
  # there:
  mkdir -p /tmp/site && tar -xJf .gpu-bundle/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
  python3 -m gammaray.app.benchmarks.gpu_check --json $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile

# what the 'cuda' image of the GPU machines lacks (KINDS.md lists what it has)
WHEELS = ["ray", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "jsonschema",
          "jsonschema-specifications", "referencing", "rpds-py", "hjson", "tensorboardX"]
STRIP = ["ray/jars", "ray/dashboard/client", "ray/serve", "ray/rllib", "ray/llm"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def pinned(name: str) -> str:
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name


def build(out_dir: str, python_version: str = "3.12") -> str:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = os.path.join(tmp, "wheels"), os.path.join(tmp, "site")
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        common = ["--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", *plat]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", wheels, *common,
                        *[pinned(n) for n in WHEELS]], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", site, "--no-compile", *common,
                        *glob.glob(os.path.join(wheels, "*.whl"))], check=True)
        # DeepSpeed ships as an sdist; the build here is pure Python: copy it with its metadata
        import deepspeed

        src = os.path.dirname(deepspeed.__file__)
        shutil.copytree(src, os.path.join(site, "deepspeed"), ignore=shutil.ignore_patterns("__pycache__"))
        for info in glob.glob(os.path.join(os.path.dirname(src), f"deepspeed-{deepspeed.__version__}*-info")):
            shutil.copytree(info, os.path.join(site, os.path.basename(info)))
        for rel in STRIP:
            shutil.rmtree(os.path.join(site, rel), ignore_errors=True)
        shutil.rmtree(os.path.join(site, "bin"), ignore_errors=True)
        target = os.path.join(out_dir, "site.tar.xz")
        subprocess.run(["tar", "-cJf", target, "-C", site, "."], check=True, env=dict(os.environ, XZ_OPT="-6 -T0"))
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", nargs="?", default=".gpu-bundle", help="where site.tar.xz goes (default .gpu-bundle)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = p.parse_args(argv)
    target = build(args.out_dir, args.python_version)
    print(f"{target}: {os.path.getsize(target) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
