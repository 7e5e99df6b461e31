"""Accuracy study: does a student trained from the cache learn what KD promises?

``python -m bench.accuracy [--quick] [--datasets synth,digits] [--seeds 3] [--out bench/results]
[--variants V,...] [--output PATH.json]``

Per dataset (synth: make demo's data, ``DEMO_DATA`` of logitcache/cli/demo_teacher.py, 64
classes x 40 training images, and scikit-learn's digits): one teacher (timm ``resnet18``; for
synth the demo's, trained once by ``make teacher`` on its own images and shipped in cli/assets;
for digits trained here with plain CE, recipe ``demo32``, and kept on disk); caches built with
:func:`logitcache.build.loop.build` (one per k, as many epochs as the students train); then
the same student (timm ``test_resnet``, same epochs / batch / lr / schedule) for every
variant and seed:

===============  ==============================================================
``ce``           CE only, on the cache's views (``LossConfig(kind="none")``)
``kd_cache``     vanilla KD from the top-10 cache (float16 values, as every cache here)
``kd_online``    vanilla KD, teacher run on the same views (``online_teacher``)
``mkd``          vanilla KD with meta-learned temperatures (``MKDConfig()``)
``dkd``          DKD (``LossConfig`` defaults) from the top-10 cache
``dist``         DIST, ``kd_weight=2.0`` (as the paper), from the top-10 cache
``kd_top{k}``    vanilla KD from a top-k cache, k in {1, 5, full} (10 is ``kd_cache``)
``kd_gap8``      codec study: vanilla KD from a top-10 cache with gap8 values
                 (the library's default codec)
``kd_sampled``   codec study: vanilla KD at T = 1 from a sampled cache, N = 32
                 draws per view (counts / N; the trainer refuses other losses)
===============  ==============================================================

The whole study runs the variants above ``kd_top{k}`` and the k sweep; ``--variants``
runs only the ones named, e.g. the codec study (``--variants ce,kd_cache,kd_gap8,kd_sampled
--datasets synth --output bench/results/accuracy_codecs.json``): the same teacher, views and
seeds, so ``kd_gap8 - kd_cache`` and ``kd_sampled - kd_cache`` are paired per seed
(``acc_gap8_minus_float16_pp``, ``acc_sampled_minus_float16_pp``: mean of the paired
differences; ``*_std_pp`` their sample std; ``paired_*`` the per-seed lists). Cache folders
are named by teacher and codec: ``<teacher>-top10.zarr`` (float16, as ever),
``<teacher>-top10-gap8.zarr``, ``<teacher>-sampled32.zarr``; every cache's ``views_digest``
(its units' plan digests) shows they hold the same views (check ``caches_same_views``).

A seed (``TrainConfig.seed``) changes the student's init and batch order; the views are
the cache's and the same for every run. Each dataset's ``fidelity`` rows (bench/accuracy/intervals.py)
give the paired differences cache - online, gap8 - float16 and projector cache - online with
their 95% intervals and whether they meet the target (|mean| <= 0.3 pp, lower end >= -0.5 pp,
>= 5 seeds); ``intervals`` gives every variant's mean and its paired difference to CE with
95% intervals. ``python -m bench.accuracy.peer`` pairs ``kd_cache`` with timm's own online KD.
Results: ``<out>/accuracy.json`` or ``--output`` (every seed's
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
