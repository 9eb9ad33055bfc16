#!/usr/bin/env bash
# The Python packages benchmarks/gpu_suite.py needs that the device machine's image lacks (it has torch,
# transformers, peft, accelerate, safetensors, pyyaml, matplotlib, tensorboard; not diffusers or pydantic), as
# wheels for its Python 3.12, into .whl/ (git-ignored through .git/info/exclude), at the versions CI uses here.
# Then one device call:
#   run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target
#        /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 && python3
#        benchmarks/gpu_suite.py --out $OUT", carry=[".whl"], timeout_s=540)
# bitsandbytes (~60 MB) does not fit the 64 MiB a call carries: the suite's rows do not use it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            prodigyopt==1.1.2 lion-pytorch==0.2.5 schedulefree==1.4.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
done
du -sh .whl
