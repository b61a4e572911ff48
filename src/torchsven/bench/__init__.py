"""``torchsven bench``: Sven beside the optimizers people use, on embedded tasks.

Tasks live in :mod:`torchsven.bench.tasks` (one file each), methods in
:mod:`torchsven.bench.methods`, the training loop in :mod:`torchsven.bench.runner`
and tables, JSON, plots and Markdown in :mod:`torchsven.bench.report`.
"""
