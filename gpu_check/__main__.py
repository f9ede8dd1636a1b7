"""`python -m gpu_check`: the whole GPU path on this machine, one summary (see gpu_check.cli)."""

from gpu_check.cli import main

raise SystemExit(main())
