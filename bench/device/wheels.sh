#!/usr/bin/env bash
# Run here, once, before a device session: the wheels of the packages this project needs that
# the device image lacks (its list: /work/.library/device/KINDS.md), for its Python 3.12, into
# .whl/ (ignored by git; `run` carries it with carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PACKAGES=(sam3==0.1.4 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
          dask==2026.8.0 partd==1.4.2 locket==1.0.0 importlib_metadata==10.2.0
          lazy-importer==0.1.0 ftfy==6.3.1 wcwidth==0.9.4 pycocotools==2.0.11)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl "${PACKAGES[@]}"
# iopath (imported by sam3) is published as a source archive only: build its pure-Python wheel.
python3 -m pip wheel -q --no-deps -w .whl iopath==0.1.10
du -sh .whl
