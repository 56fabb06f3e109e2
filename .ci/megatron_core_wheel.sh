#!/usr/bin/env bash
# Install a Python-3.12-only megatron-core release (0.17+) into a Python 3.11 virtual environment.
#
#     bash .ci/megatron_core_wheel.sh 0.19.2 .venv-mcore-0.19.2
#
# megatron-core 0.17+ declares Requires-Python >= 3.12 and ships cp312/cp313 wheels only, but its
# Python code runs on 3.11; the one compiled piece is the dataset helper, whose C++ source ships in
# the wheel. So: download the cp312 wheel, unpack its `megatron/` package and dist-info into the venv,
# build the helper for the running Python, install megatron-core's own runtime requirements, then
# this project (which then finds megatron-core already satisfied). This is how CI tests the newest
# release on its Python 3.11 machines; users on Python 3.12 simply `pip install megatron-core`.
set -euo pipefail
version=${1:?usage: megatron_core_wheel.sh VERSION VENV_DIR}
venv=${2:?usage: megatron_core_wheel.sh VERSION VENV_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)

python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet torch==2.13.0 pybind11

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work" "megatron-core==$version"
unzip -q "$work"/megatron_core-*.whl -d "$work/wheel"

site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$site/megatron" "$site"/megatron_core-*.dist-info
cp -r "$work/wheel/megatron" "$site/megatron"
cp -r "$work/wheel"/megatron_core-*.dist-info "$site/"

# The dataset index helper, compiled for this Python instead of the wheel's cp312 build.
helpers="$site/megatron/core/datasets"
rm -f "$helpers"/helpers_cpp.*.so
ext=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
g++ -O3 -Wall -shared -std=c++11 -fPIC $("$py" -m pybind11 --includes) \
    "$helpers/helpers.cpp" -o "$helpers/helpers_cpp$ext"

# megatron-core's own runtime requirements (the unconditional Requires-Dist lines of its METADATA).
requirements=$(grep '^Requires-Dist:' "$work/wheel"/megatron_core-*.dist-info/METADATA \
    | grep -v 'extra ==' | sed -e 's/^Requires-Dist: //' -e 's/;.*//')
# shellcheck disable=SC2086
"$py" -m pip install --quiet $(printf '%s\n' $requirements | sed 's/ //g')

"$py" -m pip install --quiet -e "$repo[test]"
"$py" -c "import megatron.core, sys; print('megatron-core', megatron.core.__version__, 'on Python', sys.version.split()[0])"
