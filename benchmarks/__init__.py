"""Cost benchmarks of a DrPO update against reward back-propagation (DRaFT-style); see `benchmarks/README.md`."""
