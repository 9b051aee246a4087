#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv outside the checkout and run the installed package
# there, so that a packaging mistake (a missing subpackage, missing package data, a broken entry
# point, the library importing the repository's benchmarks/) can never land.
#
# The fresh venv gets model-surgery only from the wheel; its third-party dependencies (torch, timm,
# ...: 6 GB) are borrowed from the project venv that `make test` built, through a .pth line, instead of
# being installed a second time. Nothing of the checkout is on sys.path, and that is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
project_python=${PROJECT_PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rm -rf build  # setuptools reuses build/lib: a stale module there would ship in the wheel
"$project_python" -m pip wheel --no-deps --quiet --wheel-dir "$work/dist" .
rm -rf build
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
deps=$("$project_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/_project_dependencies.pth"
"$py" -m pip install --quiet --no-deps --no-index "$work"/dist/*.whl

cd "$work"
"$py" - "$repo" "$work" <<'PY'
import importlib.util, sys
repo, work = sys.argv[1], sys.argv[2]
import surgery
assert surgery.__file__.startswith(work + "/venv/"), f"surgery comes from {surgery.__file__}, not the wheel"
for name in ("benchmarks", "tests", "adapters"):
    assert importlib.util.find_spec(name) is None, f"{name!r} is importable: the checkout leaks onto sys.path"
print("wheel:", surgery.__file__)
PY
"$py" -c "import surgery; surgery.adapters"
"$work/venv/bin/surgery" --help > /dev/null
"$work/venv/bin/surgery" layers timm:resnet18 | head -3
"$work/venv/bin/surgery" demo --photos | tail -3
# the concept demo, as the README tells an installed user to run it (the testbed ships in the wheel)
"$work/venv/bin/surgery" demo --out "$work/demo" | tail -12
test -s "$work/demo/demo.png" && test -s "$work/demo/demo.md"
echo "wheel smoke test passed"
