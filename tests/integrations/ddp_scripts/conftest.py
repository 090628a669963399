"""The scripts here are launched as programs (``lightning`` DDP, ``torchrun``), never imported
by pytest: importing them would start no training, but would import both frameworks."""

collect_ignore_glob = ["*.py"]
