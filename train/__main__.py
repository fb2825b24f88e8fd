"""`python -m train [flags] [KEY=VALUE ...]`; no arguments: the main job (see train/cli.py).
`python -m train sample --run DIR --prompt TEXT`: text from a trained run (train/sample.py).
`python -m train check --run DIR`: verifies every checkpoint of a run (train/check.py).
`python -m train finetune --from PATH --task classify --data F`: fine-tuning; `python -m train
export --run DIR --out DIR`: its model for transformers (train/export.py)."""

import sys

from train.hostmem import restart_with_huge_pages

restart_with_huge_pages()  # XLA:CPU's per-step temporaries in 2 MiB pages (train/hostmem.py)

if sys.argv[1:2] == ["sample"]:  # `python -m train sample --run DIR --prompt ...`
    from train.sample import main as sample_main

    sys.exit(sample_main(sys.argv[2:]))

if sys.argv[1:2] == ["check"]:  # `python -m train check --run DIR`
    from train.check import main as check_main

    sys.exit(check_main(sys.argv[2:]))

if sys.argv[1:2] == ["finetune"]:  # `python -m train finetune --from PATH --task classify ...`
    from train.finetune import main as finetune_main

    sys.exit(finetune_main())

if sys.argv[1:2] == ["export"]:  # `python -m train export --run DIR --out DIR`
    from train.export import export_main

    sys.exit(export_main())

from train.loop import main

sys.exit(main())
