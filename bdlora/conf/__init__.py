"""The trainer's Hydra configs, shipped in the package so ``pkg://bdlora.conf`` finds them."""
