"""The step pipeline: one ``Sven.step`` as one transaction through small stages.

* :mod:`.context`: the step's inputs, Sven's memory between steps, snapshot/restore;
* :mod:`.evaluate`: closure -> rows -> backend -> filtered direction (with fallback);
* :mod:`.update`: the update chain (post-RMS, momentum);
* :mod:`.policy`: acceptance (plain, adaptive LM, backtracking, variable rank);
* :mod:`.run`: the runner and the one StepInfo builder.

No stage receives the optimizer; see ``docs/design.md``.
"""
