"""`make bench`: how close the pipeline trains to the machine's limit, measured side by side.

One command, one run, one machine: the pipeline's training throughput (the code path of
:func:`imgclf.train.loop.train`), the same model fed the classic tutorial way (torchvision's
``CIFAR10`` through a ``DataLoader``), the same model stepping on one batch already on the
device (the ceiling, no data path), and the FLOP ceiling from large matrix products. Then the
one-off costs: preprocessing, loading the cache, a no-op ``dvc repro`` and one full epoch.

    python -m imgclf.bench [--archive PATH] [--project DIR] [--quick] [--json OUT] [--device auto|cpu|cuda]

Every throughput is the median of >= 5 timed repeats after warm-up. docs/speed.md explains each
row and holds a measured table.

No stage imports this package, so bench-only code (the classic DataLoader path, timing, the
report) lives here and changing it reruns nothing:

- :mod:`.feeders`: the recipes and the three ways of feeding one training step (and the
  tutorial's per-image transform, which the classic way uses);
- :mod:`.cifar_writer`: writes the official CIFAR-10 archive (the bench's synthetic data; the
  tests and tools use it too);
- :mod:`.timing`: clocks, repeats, FLOP counts and peaks;
- :mod:`.machine`: what the machine is and how busy it is;
- :mod:`.rows`: which throughput rows are measured, and the ratios between them;
- :mod:`.run`: the whole run (data, one-off costs, rows, one epoch of train());
- :mod:`.report`: the Markdown docs/speed.md quotes;
- :mod:`.cli`: ``python -m imgclf.bench``.
"""
