#!/usr/bin/env bash
# Build the smdebug environment for benchmarks/peer_smdebug.py (default: benchmarks/.peer-venv).
#
# smdebug 1.0.34 needs numpy < 2 and imports requests, pandas < 2.3 and psutil without
# declaring them, so it gets its own virtualenv. torch: by default the venv reuses the
# torch of the python that runs the benchmarks (TORCH_FROM, default: python3 on PATH or
# ./.venv/bin/python), through a .pth file placed after the venv's own packages (the
# venv's numpy < 2 wins); set TORCH_FROM=install to pip-install torch + torchvision.
#   bash benchmarks/setup_peer_venv.sh [VENV]
set -euo pipefail
VENV=${1:-benchmarks/.peer-venv}
BASE=${TORCH_FROM:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$BASE" -m venv --without-pip "$VENV" 2>/dev/null || true
[ -x "$VENV/bin/pip" ] || { rm -rf "$VENV"; python3 -m venv "$VENV"; }
"$VENV/bin/pip" install -q "smdebug==1.0.34" "numpy<2" requests "pandas<2.3" psutil
site=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
if [ "$BASE" = install ]; then
  "$VENV/bin/pip" install -q torch torchvision
else
  torch_site=$("$BASE" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  echo "$torch_site" > "$site/zz_torch_from_base.pth"
fi
"$VENV/bin/python" -c "import numpy, torch, torchvision, smdebug.pytorch; print('smdebug venv ready:', '$VENV', 'numpy', numpy.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
