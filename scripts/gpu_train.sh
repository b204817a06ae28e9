#!/usr/bin/env bash
# Train the bundle on a lent GPU machine (its image has PyTorch but not MONAI, nibabel, ignite or pydicom, and no
# network): run from the repository root there, with the wheels (.whl) and the packed data (.gpu) carried. Make both
# here first (DEVELOPERS.md, "Training on a lent GPU"). Arguments go to the bundle's training, e.g.
#   bash scripts/gpu_train.sh --pretrained_ckpt bundles/openkbp_dose/models/model.pt --epochs 40 --learning_rate 0.0003
# Writes OUT/run (OUT: the device's output folder; runs/gpu here): the run's model.pt, checkpoint_last.pt when the run
# ends, checkpoint_latest.pt (the newest epoch checkpoint) when TRAIN_SECONDS (default 500) cut it first, and logs.
# KIT: the packed data (default .gpu/openkbp.tar.xz).
set -euo pipefail
out=${OUT:-runs/gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 scripts/gpu_kit.py unpack "${KIT:-.gpu/openkbp.tar.xz}" /tmp/openkbp
status=0
timeout --signal=INT "${TRAIN_SECONDS:-500}" python3 -m monai.bundle run training \
  --config_file "['bundles/openkbp_dose/configs/train.json','bundles/openkbp_dose/configs/train_gpu.json']" \
  --dataset_dir /tmp/openkbp --run_dir "$out/run" --logging_file False "$@" || status=$?
python3 -c "
import shutil, sys
from monai_dose.checkpoints import latest_checkpoint
latest = latest_checkpoint(sys.argv[1])
if latest:
    shutil.copy(latest, sys.argv[1] + '/checkpoint_latest.pt')
print('latest checkpoint:', latest)
" "$out/run/models"
exit "$status"
