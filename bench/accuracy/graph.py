"""The accuracy study as a task graph: teachers, then caches, then student runs."""

from __future__ import annotations

from pathlib import Path

from . import jobs
from .plan import MAIN_K, MAIN_VARIANTS, DatasetPlan, cache_id, variant_config, variants_for
from .scheduler import Task


def study_tasks(plans: dict[str, DatasetPlan], work: Path, datas: dict, num_classes: dict, *, workers: int,
                student_workers: int, resume: bool, limit_batches: int | None,
                prefer: dict) -> tuple[list[Task], dict]:
    """Teachers first, then main caches, then students seed-major, the other caches (k sweep,
    codec study) just before their students. Every cache is built from the dataset's one teacher
    and every student run takes its views from the main cache's recipe, so a seed's runs differ
    only in the teacher signal. Returns the tasks in that order and, per dataset, its variants,
    sweep and ks (:func:`~.plan.cache_id` of each cache)."""
    teachers, caches, students, sweep_caches, sweep_students = [], [], [], [], []
    layout = {}
    for name, plan in plans.items():
        data = datas[name]
        variants, sweep, ks = variants_for(plan, num_classes[name])
        layout[name] = {"variants": variants, "sweep": sweep, "ks": ks}
        tkey = ("teacher", name)
        teachers.append(Task(tkey, [], jobs.obtain_teacher,
                             lambda done, n=name, d=data, p=plan: (n, d, work, p.teacher_epochs, student_workers,
                                                                   prefer.get(n)),
                             f"{name}/teacher"))
        for k in ks:
            t = Task(("cache", name, k), [tkey], jobs.build_cache,
                     lambda done, n=name, d=data, k=k, p=plan, tk=tkey: (n, d, work, done[tk], k, p.student_epochs,
                                                                          workers),
                     f"{name}/cache {k if isinstance(k, str) else f'top-{k}'}")
            (caches if k == MAIN_K else sweep_caches).append(t)
        for seed in plan.seeds:
            for v in variants:
                ck = ("cache", name, cache_id(v))

                def make(done, n=name, d=data, v=v, seed=seed, p=plan, ck=ck, tk=tkey):
                    return (n, d, work, v, seed, p.student_epochs,
                            variant_config(v, {cache_id(v): done[ck], MAIN_K: done[("cache", n, MAIN_K)]}, done[tk]),
                            student_workers, resume, limit_batches)

                deps = [tkey, ("cache", name, MAIN_K), ck]
                t = Task(("student", name, v, seed), deps, jobs.train_student, make, f"{name}/{v}/seed{seed}")
                (students if v in MAIN_VARIANTS else sweep_students).append(t)
    return teachers + caches + students + sweep_caches + sweep_students, layout
