"""`python -m train [flags] [KEY=VALUE ...]`; no arguments: the main job (see train/cli.py).
`python -m train sample --run DIR --prompt TEXT`: text from a trained run (train/sample.py)."""

import sys

from train.hostmem import restart_with_huge_pages

restart_with_huge_pages()  # XLA:CPU's per-step temporaries in 2 MiB pages (train/hostmem.py)

if sys.argv[1:2] == ["sample"]:  # `python -m train sample --run DIR --prompt ...`
    from train.sample import main as sample_main

    sys.exit(sample_main(sys.argv[2:]))

from train.loop import main

sys.exit(main())
