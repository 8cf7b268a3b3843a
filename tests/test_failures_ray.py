"""Through a local Ray: a synthesis actor whose process dies mid-run is restarted and its batch
retried, a plan task whose process dies is rerun, and the run ends with every sample and the bytes of a clean run; retrieval and scoring
pools of up to two actors give the bytes of one; a local Ray gets the GPUs a config asks for."""
from __future__ import annotations

import pytest

from pipeline.config import config_from_dict
from test_pipeline_fixtures import file_digests, make_toytown, run_tree, tiny_model_dir

pytestmark = pytest.mark.slow
N_TARGETS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import ray

    from stages.failures import CRASH_ENV, PLAN_CRASH_ENV

    base = tmp_path_factory.mktemp("failures")
    marker, plan_marker = base / "synthesizer-crashed", base / "plan-task-crashed"
    # Every worker of this Ray sees the hooks: the model actor's process exits on its 2nd batch,
    # and the first plan task's process midway, each once.
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {CRASH_ENV: f"2:{marker}", PLAN_CRASH_ENV: f"1:{plan_marker}"}})
    try:
        yield {"base": base, "tree": make_toytown(base / "toy", N_TARGETS), "model": tiny_model_dir(base / "model"),
               "marker": marker, "plan_marker": plan_marker}
    finally:
        ray.shutdown()


def run(world, out, **sections):
    from pipeline.run import run_pipeline

    tree = run_tree(world["tree"], world["model"], out, synthesis={"batch_size": 2, "torch_threads": 1}, **sections)
    return run_pipeline(config_from_dict(tree, where=str(world["base"] / "cfg.yaml")))


def test_a_killed_synthesis_actor_and_plan_task_are_restarted_and_the_run_gives_the_clean_bytes(world):
    killed = run(world, world["base"] / "killed")
    assert world["marker"].exists(), "the actor's process was ended on its 2nd batch"
    assert world["plan_marker"].exists(), "the plan task's process was ended, and the task rerun"
    assert (killed.synthesized, killed.written, killed.quarantined) == (N_TARGETS, N_TARGETS, 0)
    assert killed.shards_written == killed.shards == 2
    clean = run(world, world["base"] / "clean")  # the marker exists: no actor dies this time
    assert (clean.synthesized, clean.quarantined) == (N_TARGETS, 0)
    assert file_digests(world["base"] / "killed") == file_digests(world["base"] / "clean")
    from connectors.verify import verify_dataset

    assert verify_dataset(world["base"] / "killed").ok


def test_retrieval_and_scoring_pools_of_two_give_the_bytes_of_one(world):
    """Two scorer actors (plain actors: batches go to one by their first sample id) and a retrieval
    pool of up to two (a plan through Ray datasets: ``ray.inline_plan_max`` 0; the pool is built
    inside the plan task and autoscales from one actor) give the bytes of one of each."""
    from test_stages import tiny_segmenter

    seg = tiny_segmenter(world["base"] / "seg")
    outs = {}
    for n in (1, 2):
        out = world["base"] / f"pools_{n}"
        s = run(world, out, exemplars={"retrieve_actors": n}, score={"enabled": True, "segmenter": str(seg), "actors": n},
                ray={"inline_plan_max": 0})
        assert (s.synthesized, s.quarantined) == (N_TARGETS, 0)
        assert s.workers["score_actors"] == n  # fits next to one model actor and the loader on 2 CPUs
        outs[n] = out
    assert file_digests(outs[1]) == file_digests(outs[2])
    assert (outs[1] / "plan.parquet").read_bytes() == (outs[2] / "plan.parquet").read_bytes()


def test_the_middle_pools_autoscale_from_one_actor():
    from pipeline.cluster import actor_pool

    pool = actor_pool(3, autoscale=True)
    assert (pool.min_size, pool.max_size) == (1, 3)
    fixed = actor_pool(2)
    assert (fixed.min_size, fixed.max_size) == (2, 2)

def oom_once_class():
    """A batch callable that runs out of accelerator memory on its first call ever (marker file).
    Made here, in a function, so that Ray ships the class by value (workers cannot import tests/)."""

    class OomOnce:
        def __init__(self, marker: str):
            self.marker = marker

        def __call__(self, batch):
            import os

            from amgen_core.quarantine import InfrastructureError

            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                raise InfrastructureError("oom", "synthesize: oom failure, not the sample's: OutOfMemoryError")
            return batch

        synthesize = __call__  # the model actors' method (pipeline/synthesis_actors.py)

    return OomOnce


@pytest.mark.parametrize("retries", [0, 1])
def test_a_machine_failure_is_retried_by_ray_up_to_max_task_retries(world, retries):
    import ray

    from pipeline.cluster import actor_pool, configure_ray_data, restart_policy

    cfg = config_from_dict(run_tree(world["tree"], world["model"], world["base"] / "unused",
                                    ray={"max_task_retries": retries}))
    configure_ray_data(False)
    marker = world["base"] / f"oom-once-{retries}"
    ds = ray.data.range(6, override_num_blocks=3).map_batches(
        oom_once_class(), fn_constructor_args=(str(marker),), batch_size=2, compute=actor_pool(1), num_cpus=0.5,
        **restart_policy(cfg))
    if retries:
        assert sorted(r["id"] for r in ds.take_all()) == list(range(6))
    else:
        with pytest.raises(Exception, match="InfrastructureError: synthesize: oom failure"):
            ds.take_all()
    assert marker.exists()


@pytest.mark.parametrize("retries", [0, 1])
def test_a_model_actor_retries_a_machine_failure_up_to_max_task_retries(world, retries):
    import ray

    from pipeline.cluster import restart_policy
    from pipeline.synthesis_actors import queue_batch

    cfg = config_from_dict(run_tree(world["tree"], world["model"], world["base"] / "unused",
                                    ray={"max_task_retries": retries}))
    marker = world["base"] / f"oom-once-actor-{retries}"
    actor = ray.remote(num_cpus=0.5, **restart_policy(cfg))(oom_once_class()).remote(str(marker))
    try:
        if retries:
            assert ray.get(queue_batch(actor, {"id": [1]})) == {"id": [1]}
        else:
            with pytest.raises(Exception, match="InfrastructureError: synthesize: oom failure"):
                ray.get(queue_batch(actor, {"id": [1]}))
    finally:
        ray.kill(actor)
    assert marker.exists()
