"""Tests for sta_model.metrics.evaluate_rank against the plain per-query loop."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _loop_baselines import eval_rank_loop  # noqa: E402

from sta_model.metrics import evaluate_rank  # noqa: E402


def _labels(rng, nq, ng, n_ids, n_cams):
    return (rng.integers(0, n_ids, nq), rng.integers(0, n_ids, ng),
            rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_loop_with_ties_junk_and_unmatched(seed, dtype):
    rng = np.random.default_rng(seed)
    nq, ng = 37, 120
    qp, gp, qc, gc = _labels(rng, nq, ng, 25, 3)  # some queries have no true match
    # Quantised (many ties) and partly negative distances exercise the tie rule and the float keys.
    d = (rng.integers(-5, 15, (nq, ng)) * 0.5).astype(dtype)
    d[0, :] = 0.0  # a row of pure ties
    cmc, mAP = evaluate_rank(d, qp, gp, qc, gc, max_rank=20)
    ref_cmc, ref_mAP = eval_rank_loop(d, qp, gp, qc, gc, max_rank=20, kind="stable")
    assert cmc.dtype == np.float32 and cmc.shape == (20,)
    np.testing.assert_array_equal(cmc, ref_cmc)
    assert abs(mAP - ref_mAP) < 1e-12


def test_continuous_distances_and_small_chunks():
    rng = np.random.default_rng(7)
    nq, ng = 50, 300
    qp, gp, qc, gc = _labels(rng, nq, ng, 30, 6)
    d = rng.standard_normal((nq, ng)).astype(np.float32)
    ref = eval_rank_loop(d, qp, gp, qc, gc, kind="stable")
    for chunk in (1, 301, 1 << 22):
        cmc, mAP = evaluate_rank(d, qp, gp, qc, gc, chunk_elems=chunk)
        np.testing.assert_array_equal(cmc, ref[0])
        assert abs(mAP - ref[1]) < 1e-12


def test_torch_inputs_and_known_values():
    # One query (pid 1, cam 0); gallery ranked by distance: [junk (pid 1 cam 0), neg, match, neg, match].
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    gp = torch.tensor([1, 2, 1, 3, 1])
    gc = torch.tensor([0, 1, 1, 1, 2])
    cmc, mAP = evaluate_rank(d, torch.tensor([1]), gp, torch.tensor([0]), gc, max_rank=4)
    # kept order: neg, match(rank 1), neg, match(rank 3) -> AP = (1/2 + 2/4) / 2
    np.testing.assert_array_equal(cmc, np.array([0, 1, 1, 1], dtype=np.float32))
    assert mAP == pytest.approx(0.5)


def test_perfect_and_reversed_ranking():
    gp = np.array([0, 0, 1, 1])
    gc = np.array([1, 1, 1, 1])
    d = np.array([[0.0, 0.1, 0.5, 0.6], [0.5, 0.6, 0.0, 0.1]])
    cmc, mAP = evaluate_rank(d, np.array([0, 1]), gp, np.array([0, 0]), gc, max_rank=4)
    assert mAP == 1.0 and cmc[0] == 1.0
    cmc, mAP = evaluate_rank(-d, np.array([0, 1]), gp, np.array([0, 0]), gc, max_rank=4)
    assert cmc.tolist() == [0.0, 0.0, 1.0, 1.0] and mAP == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_small_gallery_and_errors():
    d = np.zeros((2, 3))
    with pytest.warns(UserWarning):
        cmc, _ = evaluate_rank(d, [0, 1], [0, 1, 2], [0, 0], [1, 1, 1], max_rank=50)
    assert cmc.shape == (3,)
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(d, [0, 1], [0, 1, 2], [1, 1], [1, 1, 1], max_rank=3)
    with pytest.raises(ValueError):
        evaluate_rank(np.zeros((2, 4)), [0, 1], [0, 1, 2], [0, 0], [1, 1, 1])


# ------------------------------------------------------------------ threads on a busy machine
@pytest.fixture
def burners():
    """One CPU-burning process per usable CPU (a machine where every core is taken)."""
    import subprocess
    import time

    from sta_model.threads import usable_cpus

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cpus())]
    time.sleep(0.5)
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_threads_follow_affinity_env_and_restore(monkeypatch):
    from sta_model import threads

    before = torch.get_num_threads()
    with threads.intra_op_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for a 1-CPU task
    assert threads.usable_cpus() == 1 and threads.choose_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= threads.usable_cpus() <= len(__import__("os").sched_getaffinity(0))
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "_runnable_others", lambda: 3)
    assert threads.idle_cpus() == 5 and threads.choose_threads(2) == 2
    monkeypatch.setattr(threads, "_runnable_others", lambda: 20)
    assert threads.idle_cpus() == 1


def test_busy_machine_gets_one_thread(burners, monkeypatch):
    """With every usable CPU taken by another process, evaluation and re-ranking run on one
    thread (torch's default would use one per core and stall on the busy ones)."""
    import sta_model.metrics as metrics
    import sta_model.rerank as rerank
    from sta_model.threads import idle_cpus

    assert idle_cpus() == 1
    seen = {}
    real_eval, real_rr = metrics._evaluate_rank, rerank._re_ranking
    monkeypatch.setattr(metrics, "_evaluate_rank",
                        lambda *a: seen.setdefault("eval", torch.get_num_threads()) and real_eval(*a))
    monkeypatch.setattr(rerank, "_re_ranking",
                        lambda *a: seen.setdefault("rr", torch.get_num_threads()) and real_rr(*a))
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_cams, g_cams = _labels(rng, 20, 60, 10, 3)
    before = torch.get_num_threads()
    evaluate_rank(rng.random((20, 60)).astype(np.float32), q_pids, g_pids, q_cams, g_cams, max_rank=5)
    rerank.re_ranking(rng.random((20, 8)), rng.random((60, 8)), k1=5, k2=3)
    assert seen == {"eval": 1, "rr": 1} and torch.get_num_threads() == before
