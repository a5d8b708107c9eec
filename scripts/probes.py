"""Train the Mamba paper's probes (selective copying, induction heads, MQAR, parity) for every mixer with one
budget per run, then write a markdown table, a PNG plot and a JSON of every run (``mambazoo.probes``).

    python scripts/probes.py --out runs/probes --budget-s 300             # every run at once, 5 minutes each
    python scripts/probes.py --out /tmp/p --smoke                         # every run for 2 steps on the CPU
    python scripts/probes.py --probes parity --mixers mamba mamba2 --budget-s 120 -- --trainer.accelerator cpu
    python scripts/probes.py --dry-run                                    # the plan and the commands only

Everything after ``--`` is passed to every ``mambazoo fit`` run; ``--probe-args PROBE=ARGS`` (repeatable) passes
ARGS to one probe's runs only, after those, e.g. a smaller MQAR for every mixer (docs/results.md, "Probes on the
CPU at a small size"):

    python scripts/probes.py --probes mqar --max-steps 600 --budget-s 3600 \
        --probe-args "mqar=--model_kwargs '{\"n_layer\": 2, \"vocab_size\": 64}' --data.init_args.seq_len 64 \
                     --data.init_args.task_kwargs '{\"n_pairs\": 8, \"vocab_size\": 64}'" -- --trainer.accelerator cpu

Needs jsonargparse (the Lightning CLI).
"""

import sys

from mambazoo.probes import main

if __name__ == "__main__":
    sys.exit(main())
