"""``tome-export bench``: ToMe x precision x backend x batch size, timed side by side, with quality and a report.

:mod:`.config` reads a matrix (no torch), :mod:`.matrix` names its backends (eager PyTorch and every registered
target), :mod:`.harness` runs it through :mod:`.subjects` (models and artifacts), :mod:`.timing`, :mod:`.memory`
and :mod:`.quality`, and :mod:`.report` / :mod:`.plots` write what people read. :mod:`.jobs` cuts the matrix into
one job per timing group and :mod:`.executors` runs them, in this process or on Ray (:mod:`.cluster`,
:mod:`.ray_executor`). :mod:`.digits` is the embedded accuracy case; importing it registers its model.
"""
