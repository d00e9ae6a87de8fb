#!/usr/bin/env bash
# Makes sure the Fashion-MNIST idx files exist and prints the folder that holds them.
#   1. already there (Debian package dataset-fashion-mnist, or an earlier download)  -> use them
#   2. apt available (as root, or with sudo)                                          -> install the Debian package
#   3. internet reachable                                                             -> torchvision's download
#   4. otherwise stop with a message saying exactly what to install.
set -euo pipefail
DEB_DIR=/usr/share/datasets/fashion-mnist
DL_DIR=${FMNIST_DOWNLOAD_DIR:-data/raw}
PY=${PY:-.venv/bin/python}
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] && [ -f "$1/t10k-labels-idx1-ubyte.gz" ]; }

if have "$DEB_DIR"; then echo "$DEB_DIR"; exit 0; fi
if have "$DL_DIR/FashionMNIST/raw"; then echo "$DL_DIR/FashionMNIST/raw"; exit 0; fi

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "fetch_fashion_mnist: installing Debian package dataset-fashion-mnist" >&2
    ( $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } ) || true
    if have "$DEB_DIR"; then echo "$DEB_DIR"; exit 0; fi
  fi
fi

echo "fetch_fashion_mnist: trying torchvision's download into $DL_DIR" >&2
if "$PY" -c "import torchvision, sys; torchvision.datasets.FashionMNIST(sys.argv[1], train=True, download=True); torchvision.datasets.FashionMNIST(sys.argv[1], train=False, download=True)" "$DL_DIR" >/dev/null 2>&1 \
   && have "$DL_DIR/FashionMNIST/raw"; then
  echo "$DL_DIR/FashionMNIST/raw"; exit 0
fi

cat >&2 <<MSG
fetch_fashion_mnist: Fashion-MNIST not found and could not be fetched.
Install it with ONE of:
  sudo apt-get install dataset-fashion-mnist        (Debian/Ubuntu; files land in $DEB_DIR)
  or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
  t10k-labels-idx1-ubyte.gz (from github.com/zalandoresearch/fashion-mnist) into $DL_DIR/FashionMNIST/raw/
MSG
exit 1
