"""Throughput and memory benchmarks: the notebook's QLoRA method vs the axolotl recipe.

See bench/README.md. Entry points: `python -m bench.build_random_mistral`,
`python -m bench.train_throughput`, `python -m bench.time_to_adapter`, `bash bench/run_device.sh`
(GPU machine).
"""
