"""Accuracy study: does a student trained from the cache learn what KD promises?

``python -m bench.accuracy [--quick] [--datasets synth,digits] [--seeds 3] [--out bench/results]``

Per dataset (the embedded synthetic set with ``generate_synth``'s defaults, and
scikit-learn's digits): one teacher (timm ``resnet18``, plain CE, recipe ``demo32``),
trained once and kept on disk; caches built with :func:`logitcache.build.build` (one per
k, as many epochs as the students train); then the same student (timm ``test_resnet``,
same epochs / batch / lr / schedule) for every variant and seed:

===============  ==============================================================
``ce``           CE only, on the cache's views (``LossConfig(kind="none")``)
``kd_cache``     vanilla KD from the top-10 cache
``kd_online``    vanilla KD, teacher run on the same views (``online_teacher``)
``mkd``          vanilla KD with meta-learned temperatures (``MKDConfig()``)
``dkd``          DKD (``LossConfig`` defaults) from the top-10 cache
``dist``         DIST, ``kd_weight=2.0`` (as the paper), from the top-10 cache
``kd_top{k}``    vanilla KD from a top-k cache, k in {1, 5, full} (10 is ``kd_cache``)
===============  ==============================================================

A seed (``TrainConfig.seed``) changes the student's init and batch order; the views are
the cache's and the same for every run. Results: ``<out>/accuracy.json`` (every seed's
final val top-1, mean, sample std; headline keys at the top level), plots
``accuracy_vs_k.png`` and ``accuracy_curves.png``. ``--quick`` (1 seed, 2 epochs, synth
only, no k sweep) proves the pipeline and writes ``accuracy_quick*`` files instead.

Work (data, teachers, caches, student runs) goes to ``--workdir`` (default
``runs/accuracy``, git-ignored). Teachers and caches are reused by later invocations;
finished student runs are reused only with ``--resume`` (a study killed half-way resumes
where it stopped). ``--quick`` uses the full study's teacher when one is on disk.

Runs go ``--jobs`` (2) at a time in forked processes with one torch thread each; teacher
and students render their views in-process (``--student-workers 0``), cache builds use
two DataLoader workers. None of that changes a number: views and batch order are
functions of seeds only. Runtime: wall and CPU seconds of the invocation, and summed
over every task (``runtime.tasks_*``, reused tasks with their stored times);
``quiet_2core_estimate_s`` = all tasks' CPU seconds / 2.

Modules: ``plan`` (models, datasets, variants), ``jobs`` (dataset, teacher, cache, student
run), ``graph`` (the study as tasks), ``scheduler`` (runs them in a process pool),
``summary`` (accuracy.json), ``report`` (markdown, plots), ``study`` (``run``), ``cli``.
"""

from .cli import main
from .report import markdown, plot
from .study import run

__all__ = ["main", "markdown", "plot", "run"]
