#!/usr/bin/env bash
# The wheels a GPU machine without internet needs beyond torch + deepspeed to run igpt-ds and its GPU checks:
# jsonargparse (the command line) with docstring-parser (--help text), pytest for tests/gpu, and what
# torch.utils.tensorboard imports (tensorboard, protobuf's abi3 wheel, absl-py) for the trainer's metrics. Run here, from
# the checkout root, after ../shared/device/make-wheels.sh; bench/gpu_matrix.sh installs everything in .whl/.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
    jsonargparse docstring-parser typeshed-client importlib-resources pytest pluggy iniconfig packaging \
    tensorboard absl-py
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl protobuf
ls -1 .whl
